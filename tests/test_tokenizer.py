"""The offline CLIP tokenizer reproduces the released tokenizers' ids."""

from turbokit.tokenizer import PAD_OPENCLIP, clip_tokenizer


def test_known_clip_token_ids():
    # Ids of the released openai/clip-vit-large-patch14 tokenizer.
    ids = clip_tokenizer()("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip_tokenizer()) == 49408


def test_padding_token_per_family():
    openai = clip_tokenizer()("hi", padding="max_length", max_length=77).input_ids
    openclip = clip_tokenizer(PAD_OPENCLIP)("hi", padding="max_length", max_length=77).input_ids
    assert openai[-1] == 49407 and openclip[-1] == 0  # "<|endoftext|>" vs "!"
    assert len(openai) == 77


def test_long_prompts_truncate_to_77_tokens():
    ids = clip_tokenizer()(" ".join(["word"] * 200), truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407
