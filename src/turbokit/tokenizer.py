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
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from turbokit.errors import TurbokitError

if TYPE_CHECKING:  # transformers is imported where a tokenizer is built: a warm launch needs none of it (~1 s)
    from transformers import CLIPTokenizer

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
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77)


class FastClipTokenizer:
    """The part of CLIPTokenizer's interface the pipeline uses, for a warm launch: transformers' CLIPTokenizer
    (5.x) is a wrapper around a `tokenizers` (Rust) tokenizer, and this one runs that same tokenizer, saved
    from it on an earlier launch (`serialized`), without importing transformers (~1 s of a 2-core CPU's launch).
    Special tokens, truncation and padding as the wrapper applies them (tested equal on random text)."""

    def __init__(self, serialized: str, pad_token_id: int, model_max_length: int) -> None:
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(serialized)
        self._backend.no_padding()  # the wrapper leaves its last call's settings in the saved state
        self._backend.no_truncation()
        self.pad_token_id, self.model_max_length = pad_token_id, model_max_length

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool = False,
        return_tensors: str | None = None,
    ) -> Any:
        if padding not in (False, "max_length") or return_tensors not in (None, "pt"):
            raise TypeError(f"unsupported here: padding={padding!r}, return_tensors={return_tensors!r}")
        length = max_length or self.model_max_length
        rows = [e.ids for e in self._backend.encode_batch([text] if isinstance(text, str) else list(text))]
        if truncation:  # as the wrapper: the text's tokens are cut, the end token kept
            rows = [r if len(r) <= length else r[: length - 1] + r[-1:] for r in rows]
        if padding == "max_length":
            rows = [r + [self.pad_token_id] * (length - len(r)) for r in rows]
        if return_tensors == "pt":
            import torch

            return SimpleNamespace(input_ids=torch.tensor(rows))
        return SimpleNamespace(input_ids=rows[0] if isinstance(text, str) else rows)

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids).replace("</w>", " ").strip()  # as CLIPTokenizer's decode
