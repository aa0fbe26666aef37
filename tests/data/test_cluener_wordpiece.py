"""CLUENER batches with the WordPiece tokenizer: `[CLS] pieces [SEP]`, and gold spans
that are exactly runs of tokens, the others counted.

The reference is Hugging Face's `BertTokenizerFast` over the same `vocab.txt` (ids and
character offsets) and bert4keras's rule for the gold spans (a span is kept when its
first character starts a token and its last one ends a token), applied to the
records of the built dataset (the evaluation split is read in their order).
"""

from __future__ import annotations

import numpy as np
import pytest

from kexue.data import DataConfig, make_builder, make_dataset, token_to_char_spans
from tests.data.conftest import CLUENER_DEV_LINES, requires_cluener

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(path: str, texts: list[str], rng: np.random.Generator) -> None:
    """Special tokens, the characters of `texts` (lower-cased; a random 3% left out so
    that `[UNK]` occurs), two-letter English words and `##` pieces of letters and digits
    (so English words split inside, where entity boundaries may fall)."""
    chars = sorted({c for t in texts for c in t.lower() if not c.isspace()})
    chars = [c for c in chars if rng.random() > 0.03]
    ascii_chars = [c for c in chars if c.isascii() and c.isalnum()]
    pairs = sorted({t.lower()[i:i + 2] for t in texts for i in range(len(t) - 1)
                    if t[i:i + 2].isascii() and t[i:i + 2].isalpha()})
    vocab = SPECIALS + chars + pairs + ["##" + c for c in ascii_chars] + ["##" + p for p in pairs]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(dict.fromkeys(vocab)) + "\n")


def text_and_spans(record: dict) -> tuple[str, set[tuple[int, int, int]]]:
    text = record["text"]
    text = text if isinstance(text, str) else bytes(text).decode("utf-8")
    return text, set(zip(*(np.asarray(record[key]).tolist()
                           for key in ("span_type", "span_start", "span_end")), strict=True))


@requires_cluener
def test_wordpiece_batches_hold_the_gold_spans_that_are_whole_tokens(cluener_subset, data_dir,
                                                                    tmp_path, rng):
    transformers = pytest.importorskip("transformers", reason="the reference tokenizer "
                                       "needs transformers (pip install -e '.[test]')")
    make_dataset(DataConfig(name="cluener", task="ner", tokenizer="char",
                            manual_dir=cluener_subset, data_dir=data_dir), "eval",
                 process_index=0, process_count=1)  # builds the dataset
    source = make_builder("cluener", data_dir).as_data_source(split="validation")
    records = [text_and_spans(source[i]) for i in range(len(source))]
    assert len(records) == CLUENER_DEV_LINES
    write_vocab(str(tmp_path / "vocab.txt"), [text for text, _ in records], rng)
    reference = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=True)
    seq_len = 40  # shorter than some sentences: the cut drops spans too
    config = DataConfig(name="cluener", task="ner", tokenizer="wordpiece",
                        vocab_file=str(tmp_path / "vocab.txt"), manual_dir=cluener_subset,
                        data_dir=data_dir, seq_len=seq_len, batch_size=8, max_spans=32)
    batches = make_dataset(config, "eval", process_index=0, process_count=1)
    meta = batches.metadata
    assert meta.vocab_size == len(reference.get_vocab())
    rows = [{key: value[i] for key, value in batch.items()}
            for batch in batches for i in range(len(batch["tokens"]))]
    assert len(rows) >= len(records)
    counts = {"gold": 0, "kept": 0, "cut": 0, "inside a piece": 0}
    for (text, gold), row in zip(records, rows, strict=False):
        encoded = reference(text, truncation=True, max_length=seq_len,
                            return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        n = len(ids)
        np.testing.assert_array_equal(row["tokens"][:n], ids)
        assert ids[0] == reference.cls_token_id and ids[-1] == reference.sep_token_id
        np.testing.assert_array_equal(row["valid"], np.arange(seq_len) < n)
        np.testing.assert_array_equal(row["offsets"][:n], offsets)
        starts = {s: i for i, (s, e) in enumerate(offsets) if e > s}
        ends = {e - 1: i for i, (s, e) in enumerate(offsets) if e > s}
        covered = max(e for _, e in offsets)  # characters up to here are in the input
        kept = {(k, starts[a], ends[b]) for k, a, b in gold if a in starts and b in ends}
        spans = {tuple(s) for s in row["spans"].tolist() if s[0] >= 0}
        assert spans == kept, text
        # the kept token spans map back to exactly the gold characters
        back = token_to_char_spans(row["offsets"][:n], np.array(sorted(spans)).reshape(-1, 3))
        assert {tuple(s) for s in back.tolist()} <= gold
        assert len(back) == len(spans) and (back >= 0).all()
        assert int(row["dropped_spans"]) == len(gold) - len(kept)
        present = {k for k, a, _ in gold if a < covered}
        np.testing.assert_array_equal(np.flatnonzero(row["type_labels"]), sorted(present))
        counts["gold"] += len(gold)
        counts["kept"] += len(kept)
        for _, _, b in gold - {(k, a, b) for k, a, b in gold if a in starts and b in ends}:
            counts["cut" if b >= covered else "inside a piece"] += 1
    print(f"CLUENER dev (first {len(records)} lines, seq_len {seq_len}): {counts}")
    assert counts["kept"] + counts["cut"] + counts["inside a piece"] == counts["gold"]
    assert counts["cut"] > 0 and counts["kept"] > 0.8 * counts["gold"]
    for row in rows[len(records):]:  # padding rows of the last batch
        assert row["example_weights"] == 0 and row["dropped_spans"] == 0


def test_wordpiece_needs_a_vocab_file_and_the_cluener_tasks():
    with pytest.raises(ValueError, match=r"`vocab_file`: tokenizer 'wordpiece' needs"):
        DataConfig(name="cluener", task="ner", tokenizer="wordpiece")
    with pytest.raises(ValueError, match=r"'wordpiece' is for the tasks 'ner' and 'multilabel'"):
        DataConfig(task="lm", tokenizer="wordpiece", vocab_file="vocab.txt")
    with pytest.raises(ValueError, match=r"`tokenizer`: expected one of \['byte', 'char', "
                                         r"'wordpiece'\]; got 'bpe'"):
        DataConfig(tokenizer="bpe")


@pytest.mark.parametrize("seq_len, spans, dropped, types", [
    (16, [(0, 4, 6), (1, 4, 7), (3, 8, 9)], 1, [0, 1, 2, 3]),
    # cut to [CLS] 我 买 了 ip ##ho ##ne [SEP]: "iPhone6" and "手机" leave the input
    (8, [(0, 4, 6)], 3, [0, 1, 2]),
])
def test_spans_inside_a_word_piece_or_beyond_the_cut_are_dropped(seq_len, spans, dropped,
                                                                 types):
    from kexue.data import WordPieceTokenizer, ner_example

    tokenizer = WordPieceTokenizer([*SPECIALS, "我", "买", "了", "手", "机", "ip", "##ho",
                                    "##ne", "##6"])
    text = "我买了iPhone6手机"  # [CLS] 我 买 了 ip ##ho ##ne ##6 手 机 [SEP]
    gold = np.array([(0, 3, 8), (1, 3, 9), (2, 4, 5), (3, 10, 11)])  # iPhone, iPhone6, Ph, 手机
    example = ner_example(text, gold[:, 0], gold[:, 1], gold[:, 2], tokenizer=tokenizer,
                          seq_len=seq_len, num_types=4, max_spans=4)
    assert [tuple(s) for s in example["spans"].tolist() if s[0] >= 0] == spans
    assert int(example["dropped_spans"]) == dropped
    np.testing.assert_array_equal(np.flatnonzero(example["type_labels"]), types)
    expected_offsets = [(0, 0), (0, 1), (1, 2), (2, 3), (3, 5), (5, 7), (7, 9), (9, 10),
                        (10, 11), (11, 12), (0, 0)]
    if seq_len == 8:
        expected_offsets = [*expected_offsets[:7], (0, 0)]
    n = len(expected_offsets)
    np.testing.assert_array_equal(example["offsets"][:n], expected_offsets)
    assert example["tokens"][n - 1] == tokenizer.eos_id and example["valid"].sum() == n
