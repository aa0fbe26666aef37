"""BERT WordPiece tokenizer from a `vocab.txt`, with character offsets (Hugging Face `tokenizers`).

The tokenizer of the BERT / RoFormer checkpoints (`kexue.models.load_pretrained`):
BERT's normalizer (control characters dropped, whitespace unified, optional
lower-casing and accent stripping, spaces around every CJK character, so Chinese
is split per character), BERT's pre-tokenizer (whitespace and punctuation), then
greedy longest-match-first WordPiece with `##` continuation pieces (Wu et al.,
2016; Devlin et al., 2019). Built on the `tokenizers` package (the `pretrained`
extra), which also tracks each token's character span in the original text.

It follows the `kexue.data.tokenizers.Tokenizer` protocol: `[PAD]` is `pad_id`,
`[UNK]` `unk_id`, `[CLS]` `bos_id`, `[SEP]` `eos_id`, `[MASK]` `mask_id`;
`encode` returns the ids without `[CLS]` / `[SEP]` unless asked.

Spans: `char_to_token_spans` maps character spans (`(type, start, end)` rows, end
inclusive, as `kexue.data` writes them) to token spans, and
`token_to_char_spans` maps predicted token spans back to characters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

__all__ = ["WORDPIECE_SPECIALS", "WordPieceTokenizer", "char_to_token_spans",
           "token_to_char_spans"]

#: Protocol role → token of the BERT vocabularies.
WORDPIECE_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "bos": "[CLS]", "eos": "[SEP]",
                      "mask": "[MASK]"}
_CONTROL_TOKEN = re.compile(r"^(\[[^\]]*\]|<[^>]*>)$")


def read_vocab(path: str | os.PathLike) -> list[str]:
    """Tokens of a `vocab.txt`, one per line, in id order (the trailing newline cut)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


class WordPieceTokenizer:
    """BERT WordPiece over a `vocab.txt` (see the module doc).

    Args:
      vocab: a `vocab.txt` path, or the tokens in id order.
      lowercase: lower-case the text first (BERT "uncased" / Chinese checkpoints).
      strip_accents: strip accents (None: as `lowercase`, like BERT).
      max_input_chars_per_word: longer words become `[UNK]`.

    Attributes:
      vocab_size: number of vocabulary lines (the checkpoint's `vocab_size`).
      regular_ids: `[low, high)`, the ordinary tokens: after the leading block of
        bracketed control tokens (`[PAD]`, `[unused…]`, `[UNK]`, `[CLS]`, ...,
        `<S>`) and before any special token that follows it; MLM corruption draws
        random replacements from it.

    Raises:
      ValueError: an empty vocabulary or one without the five special tokens.
    """

    def __init__(self, vocab: str | os.PathLike | Sequence[str], *, lowercase: bool = True,
                 strip_accents: bool | None = None, max_input_chars_per_word: int = 100):
        try:
            from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
        except ImportError:
            raise ImportError("WordPieceTokenizer needs the `tokenizers` package: pip install "
                              "'kexue[pretrained]'") from None
        tokens = read_vocab(vocab) if isinstance(vocab, str | os.PathLike) else list(vocab)
        if not tokens:
            raise ValueError("vocab: expected at least one token; got an empty vocabulary")
        index: dict[str, int] = {}
        for i, token in enumerate(tokens):
            index[token] = i  # a repeated token keeps its last id, as BERT's loader does
        missing = [t for t in WORDPIECE_SPECIALS.values() if t not in index]
        if missing:
            raise ValueError(f"vocab: expected the special tokens "
                             f"{list(WORDPIECE_SPECIALS.values())}; missing {missing}")
        self.tokens = tuple(tokens)
        self.lowercase = lowercase
        self.vocab_size = len(tokens)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id = (
            index[WORDPIECE_SPECIALS[role]] for role in ("pad", "unk", "bos", "eos", "mask"))
        self.regular_ids = self._regular_range()

        tokenizer = Tokenizer(models.WordPiece(index, unk_token=WORDPIECE_SPECIALS["unk"],
                                               continuing_subword_prefix="##",
                                               max_input_chars_per_word=max_input_chars_per_word))
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents,
            lowercase=lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        tokenizer.add_special_tokens(list(WORDPIECE_SPECIALS.values()))
        self._tokenizer = tokenizer

    def _regular_range(self) -> tuple[int, int]:
        low = 0
        while low < self.vocab_size and _CONTROL_TOKEN.match(self.tokens[low]):
            low += 1
        specials = (self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id)
        high = min([i for i in specials if i >= low] + [self.vocab_size])
        if high <= low:
            raise ValueError("vocab: no ordinary tokens after the leading control tokens")
        return low, high

    def encode_with_offsets(self, text: str | bytes, *,
                            add_special_tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`(ids int32 [n], offsets int32 [n, 2])`: token `i` is `text[start:end]`.

        Offsets index characters of `text` (bytes are decoded as UTF-8, invalid bytes
        → U+FFFD). `[CLS]` / `[SEP]`, added when `add_special_tokens`, cover nothing:
        `(0, 0)`. Characters the normalizer drops (whitespace, control characters)
        belong to no token.
        """
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", errors="replace")
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int32)
        offsets = np.asarray(encoding.offsets, dtype=np.int32).reshape(-1, 2)
        if add_special_tokens:
            ids = np.concatenate([[self.bos_id], ids, [self.eos_id]]).astype(np.int32)
            offsets = np.concatenate([np.zeros((1, 2), np.int32), offsets,
                                      np.zeros((1, 2), np.int32)])
        return ids, offsets

    def encode(self, text: str | bytes, *, add_special_tokens: bool = False) -> np.ndarray:
        """Text → int32 ids `[n]` (`[CLS] … [SEP]` around them if `add_special_tokens`)."""
        return self.encode_with_offsets(text, add_special_tokens=add_special_tokens)[0]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids → text: special tokens dropped, `##` pieces joined to their word, words
        (and CJK characters) separated by spaces."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)
               if 0 <= i < self.vocab_size]
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


def char_to_token_spans(offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Character spans → token spans over tokens with character `offsets`.

    A span `(type, a, b)` (characters `a … b`, inclusive) becomes `(type, i, j)`
    with `i` the first token ending after `a` and `j` the last token starting at
    or before `b`: the tokens that overlap it. A span no token overlaps becomes a
    row of −1, as do padding rows (any −1).

    Args:
      offsets: int `[n, 2]` `(start, end)` character offsets (`encode_with_offsets`);
        empty `(0, 0)` entries (`[CLS]`, `[SEP]`) overlap nothing.
      spans: int `[P, 3]` rows `(type, start, end)`.

    Returns:
      int32 `[P, 3]`.
    """
    offsets, spans = np.asarray(offsets, np.int64), np.asarray(spans, np.int64).reshape(-1, 3)
    if offsets.size == 0:
        return np.full(spans.shape, -1, np.int32)
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = ends > starts
    kind, a, b = spans[:, 0], spans[:, 1], spans[:, 2]
    overlap = (real[None, :] & (ends[None, :] > a[:, None])
               & (starts[None, :] <= b[:, None]))  # [P, n]
    any_overlap = overlap.any(axis=1) & (spans >= 0).all(axis=1)
    first = np.argmax(overlap, axis=1)
    last = overlap.shape[1] - 1 - np.argmax(overlap[:, ::-1], axis=1)
    out = np.stack([kind, first, last], axis=1)
    return np.where(any_overlap[:, None], out, -1).astype(np.int32)


def token_to_char_spans(offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Token spans `(type, i, j)` → character spans `(type, start_i, end_j − 1)`.

    Rows with a −1, an index outside `[0, n)`, `j < i` or an end token that covers
    no character (`[CLS]`, `[SEP]`) become rows of −1.

    Args:
      offsets: int `[n, 2]` character offsets of the tokens.
      spans: int `[P, 3]` token spans.

    Returns:
      int32 `[P, 3]` character spans, end inclusive.
    """
    offsets, spans = np.asarray(offsets, np.int64), np.asarray(spans, np.int64).reshape(-1, 3)
    n = len(offsets)
    kind, i, j = spans[:, 0], spans[:, 1], spans[:, 2]
    ok = (kind >= 0) & (i >= 0) & (j >= i) & (j < n)
    i_safe, j_safe = np.where(ok, i, 0), np.where(ok, j, 0)
    if n:
        start, end = offsets[i_safe, 0], offsets[j_safe, 1]
        ok &= (offsets[i_safe, 1] > start) & (end > offsets[j_safe, 0])
    else:
        start = end = np.zeros_like(i)
    out = np.stack([kind, start, end - 1], axis=1)
    return np.where(ok[:, None], out, -1).astype(np.int32)
