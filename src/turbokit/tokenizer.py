"""The CLIP BPE tokenizer, built offline from the vocabulary that ships in the open-clip-torch wheel.

Single-file checkpoints and turbokit's own tiny models carry no tokenizer files, and no hub is
reachable offline, so the tokenizer is rebuilt here from OpenAI's BPE merges list — the same
vocabulary (49,408 tokens) that every SD/SDXL text encoder uses.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer

from turbokit.errors import TurbokitError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
# SD 2.x's OpenCLIP tokenizer and SDXL's second tokenizer pad with "!"; the OpenAI CLIP tokenizers
# of SD 1.x and SDXL's first pad with the end token. Padded positions feed cross-attention, so
# the pad token changes the image.
PAD_OPENAI = "<|endoftext|>"
PAD_OPENCLIP = "!"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map that CLIP's BPE is defined over."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def find_bpe_file() -> Path:
    """Locate the BPE vocabulary inside the installed open-clip-torch package (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TurbokitError(
            "The CLIP tokenizer vocabulary was not found: install it with "
            "`pip install --no-deps open-clip-torch`, or use a model folder that has tokenizer files."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise TurbokitError(f"The CLIP tokenizer vocabulary is missing from {path.parent}; reinstall open-clip-torch.")
    return path


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(find_bpe_file()) as f:
        lines = f.read().decode("utf-8").split("\n")
    # The file's first line is a header; CLIP keeps the first 48,894 merges (49408 − 256·2 − 2).
    merges = lines[1 : VOCAB_SIZE - 256 * 2 - 2 + 1]
    pairs = [(a, b) for a, b in (m.split() for m in merges)]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(p) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, pairs


def clip_tokenizer(pad_token: str = PAD_OPENAI) -> CLIPTokenizer:
    """A CLIPTokenizer identical to the released SD/SDXL ones, built without network access."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77)
