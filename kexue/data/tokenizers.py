"""Byte-level and character-level tokenizers (pure Python and NumPy, no pickle).

Both share five special tokens, `<pad> <unk> <bos> <eos> <mask>`, and expose their ids
as attributes, so pipelines never hard-code them:

* `ByteTokenizer`: the id of a UTF-8 byte is the byte itself (0..255); the specials
  follow at 256..260, so `vocab_size = 261` and every string round-trips.
* `CharTokenizer`: specials first (ids 0..4, `<pad>` = 0), then one id per character of
  a vocabulary counted on a training split, saved as JSON and reloaded; characters
  outside it encode to `<unk>`.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from kexue.ops._checks import check_int

__all__ = [
    "SPECIAL_TOKENS",
    "ByteTokenizer",
    "CharTokenizer",
    "Tokenizer",
]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>", "<mask>")
_VOCAB_FORMAT = "kexue.char_vocab"


class Tokenizer(Protocol):
    """What the pipelines need from a tokenizer."""

    vocab_size: int
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int
    mask_id: int
    regular_ids: tuple[int, int]

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, specials at 256..260 (`vocab_size` 261)."""

    def __init__(self) -> None:
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id = range(256, 261)
        self.vocab_size = 261
        self.regular_ids = (0, 256)

    def encode(self, text: str | bytes) -> np.ndarray:
        """`str` (encoded as UTF-8) or raw `bytes` -> int32 `[len(bytes)]`."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode_bytes(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """Ids -> bytes, dropping special ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=261)"


class CharTokenizer:
    """One id per character; `<pad>`=0, `<unk>`=1, `<bos>`=2, `<eos>`=3, `<mask>`=4.

    Args:
      chars: the vocabulary, one single-character string per entry, in id order
        (ids start at `len(SPECIAL_TOKENS)`).
    """

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        for position, char in enumerate(chars):
            if not isinstance(char, str) or len(char) != 1:
                raise ValueError(
                    f"`chars`[{position}] must be a single character, got {char!r}"
                )
        if len(set(chars)) != len(chars):
            repeated = [c for c, k in collections.Counter(chars).items() if k > 1]
            raise ValueError(f"`chars` repeats characters: {repeated[:10]!r}")
        self.chars: tuple[str, ...] = tuple(chars)
        offset = len(SPECIAL_TOKENS)
        self._index = {char: offset + i for i, char in enumerate(self.chars)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id = range(offset)
        self.vocab_size = offset + len(self.chars)
        self.regular_ids = (offset, self.vocab_size)

    @classmethod
    def build(
        cls, texts: Iterable[str], *, min_count: int = 1, max_size: int | None = None
    ) -> CharTokenizer:
        """Counts characters over `texts`; keeps those seen >= `min_count` times.

        Order: most frequent first, ties by code point, so the vocabulary depends only on
        the multiset of characters. `max_size` caps the number of characters kept.
        """
        check_int("min_count", min_count)
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(text)
        kept = sorted((c for c, k in counts.items() if k >= min_count),
                      key=lambda c: (-counts[c], c))
        if max_size is not None:
            kept = kept[:max_size]
        return cls(kept)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary as UTF-8 JSON (atomically: temporary file, then rename)."""
        payload = {"format": _VOCAB_FORMAT, "version": 1,
                   "specials": list(SPECIAL_TOKENS), "chars": list(self.chars)}
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False, indent=0)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        """Reads a vocabulary written by `save`; ValueError if the file is not one."""
        with open(path, encoding="utf-8") as f:
            try:
                payload = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{os.fspath(path)}: not a JSON vocabulary ({error})") from None
        if not isinstance(payload, dict) or payload.get("format") != _VOCAB_FORMAT:
            raise ValueError(f"{os.fspath(path)}: not a {_VOCAB_FORMAT} file")
        if payload.get("specials") != list(SPECIAL_TOKENS):
            raise ValueError(
                f"{os.fspath(path)}: specials {payload.get('specials')!r} differ from "
                f"{list(SPECIAL_TOKENS)!r}"
            )
        return cls(payload["chars"])

    def encode(self, text: str | bytes) -> np.ndarray:
        """Text (bytes are decoded as UTF-8, invalid bytes -> U+FFFD) -> int32 `[len]`."""
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", errors="replace")
        unk = self.unk_id
        return np.fromiter((self._index.get(c, unk) for c in text), dtype=np.int32,
                           count=len(text))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; `<unk>` becomes U+FFFD, the other specials are dropped."""
        offset = len(SPECIAL_TOKENS)
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if offset <= i < self.vocab_size:
                out.append(self.chars[i - offset])
            elif i == self.unk_id:
                out.append("\ufffd")
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
