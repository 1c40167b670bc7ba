"""The offline CLIP tokenizer reproduces the released tokenizers' ids; the warm launch's fast one, the slow one's."""

import random
import string

import pytest
import torch

from turbokit.tokenizer import PAD_OPENAI, PAD_OPENCLIP, FastClipTokenizer, clip_tokenizer


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


def _random_prompt(rng: random.Random) -> str:
    words = ["a", "red", "CIRCLE", "it's", "photo", "of", "cat", "4k", "8-bit", "hello,world", "x" * 30, "don't"]
    words += ["café", "一只猫", "Ünïcödé", "🙂", "a\x0bb", "\x01"]
    punctuation = rng.choice(string.punctuation) * rng.randint(1, 3)
    pieces = [rng.choice([*words, punctuation]) for _ in range(rng.randint(0, 40))]
    pieces += ["".join(rng.choice(string.printable) for _ in range(rng.randint(0, 12)))]
    rng.shuffle(pieces)
    return rng.choice([" ", "  ", "\t", "\n", " \r\n "]).join(pieces)


@pytest.mark.parametrize("pad", [PAD_OPENAI, PAD_OPENCLIP])
def test_the_warm_launch_tokenizer_gives_transformers_ids(pad):
    slow = clip_tokenizer(pad)
    slow("warm up", padding="max_length", max_length=77, truncation=True)  # leaves settings in the backend
    fast = FastClipTokenizer(slow.backend_tokenizer.to_str(), slow.pad_token_id, slow.model_max_length)
    prompts = [_random_prompt(random.Random(seed)) for seed in range(300)] + ["", " ", " ".join(["word"] * 200)]
    padded = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(fast(prompts, **padded).input_ids, slow(prompts, **padded).input_ids)
    assert [fast(p).input_ids for p in prompts] == [slow(p).input_ids for p in prompts]  # neither cut nor padded
    long = slow(" ".join(["word", "café"] * 60)).input_ids
    assert fast.decode(long[76:-1]) == slow.decode(long[76:-1])  # the long-prompt warning's text
    with pytest.raises(TypeError, match="unsupported"):
        fast(prompts, padding=True)
