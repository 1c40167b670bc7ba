"""Prompt-embedding cache: generate-as-you-type and batches repeat prompts, the text encoder need not."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from turbokit.families import Conditioning


class PromptCache:
    """LRU map from prompt text to its conditioning row; encodes only the prompts it has not seen."""

    def __init__(self, encode: Callable[[list[str]], Conditioning], max_entries: int = 256) -> None:
        self._encode = encode
        self._rows: OrderedDict[str, Conditioning] = OrderedDict()
        self.max_entries = max_entries

    def __call__(self, prompts: list[str]) -> Conditioning:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        if missing:
            encoded = self._encode(missing)
            for i, prompt in enumerate(missing):
                self._rows[prompt] = encoded[i : i + 1]
        rows = []
        for prompt in prompts:
            self._rows.move_to_end(prompt)
            rows.append(self._rows[prompt])
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)
        return Conditioning.cat(rows)

    def clear(self) -> None:
        self._rows.clear()
