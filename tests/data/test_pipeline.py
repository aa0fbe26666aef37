"""Grain pipelines: LM windows, MLM masking, NER labels, determinism, sharding, resuming."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

from kexue.data import (
    ByteTokenizer,
    CharTokenizer,
    DataConfig,
    make_builder,
    make_dataset,
    mlm_mask,
    prediction_list,
    prepare,
)


def _lm_config(data_dir, pattern, **overrides):
    config = dict(data_dir=data_dir, pattern=pattern, eval_fraction=0.25, seq_len=16,
                  batch_size=4, num_threads=0, seed=3)
    config.update(overrides)
    return config


def _ner_config(data_dir, manual_dir, **overrides):
    config = dict(name="cluener", task="ner", tokenizer="char", data_dir=data_dir,
                  manual_dir=manual_dir, seq_len=56, batch_size=8, num_threads=0, seed=5)
    config.update(overrides)
    return config


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _stream(data_dir, pattern, split, tokenizer):
    """Independent reference: documents in source order, each followed by <eos>."""
    builder = prepare(make_builder("text_files", data_dir, pattern=pattern, eval_fraction=0.25))
    source = builder.as_data_source(split)
    pieces = []
    for i in range(len(source)):
        pieces += [*source[i]["content"], tokenizer.eos_id]
    return np.asarray(pieces)


def test_lm_windows_are_the_stream_cut_with_one_token_overlap(data_dir, text_corpus):
    seq = 16
    it = make_dataset(_lm_config(data_dir, text_corpus, shuffle=False), "train",
                      process_index=0, process_count=1)
    assert it.metadata.vocab_size == 261 and it.metadata.local_batch_size == 4
    stream = _stream(data_dir, text_corpus, "train", ByteTokenizer())
    windows = np.concatenate([b["tokens"] for b in _take(it, 6)])
    assert windows.shape == (24, seq + 1) and windows.dtype == np.int32
    for k, window in enumerate(windows):  # inputs window[:-1], targets window[1:]
        np.testing.assert_array_equal(window, stream[k * seq:k * seq + seq + 1])
    np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])


def test_lm_eval_pass_covers_the_held_out_files_once(data_dir, text_corpus):
    seq = 16
    it = make_dataset(_lm_config(data_dir, text_corpus), "eval", process_index=0,
                      process_count=1)
    batches = list(it)
    tokens = np.concatenate([b["tokens"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.shape == (len(tokens), seq) and weights.dtype == np.float32
    stream = _stream(data_dir, text_corpus, "validation", ByteTokenizer())
    # Every token after the first is a weighted target exactly once.
    assert weights.sum() == len(stream) - 1
    targets = tokens[:, 1:][weights > 0]
    np.testing.assert_array_equal(targets, stream[1:])
    assert (tokens[:, 1:][weights == 0] == ByteTokenizer().pad_id).all()


def test_lm_eval_batches_equal_on_every_process(data_dir, text_corpus):
    counts = []
    for process_index in range(2):
        config = _lm_config(data_dir, text_corpus, eval_batches=40, batch_size=8)
        batches = list(make_dataset(config, "eval", process_index=process_index,
                                    process_count=2))
        counts.append(len(batches))
        assert batches[-1]["weights"].sum() == 0  # the shard ran out: padding batches
    assert counts == [40, 40]


def test_mlm_mask_statistics(rng):
    tokenizer = ByteTokenizer()
    tokens = rng.integers(0, 256, size=(64, 512)).astype(np.int32)
    tokens[:, -5:] = tokenizer.pad_id
    tokens[:, 100] = tokenizer.eos_id
    valid = tokens != tokenizer.pad_id
    out = mlm_mask(tokens, valid, rng, tokenizer=tokenizer)
    chosen = out["weights"] > 0
    regular = valid & (tokens < 256)
    assert not chosen[~regular].any()  # specials and padding are never chosen
    rate = chosen[regular].mean()
    n = regular.sum()
    assert abs(rate - 0.15) < 5 * np.sqrt(0.15 * 0.85 / n)
    masked = out["tokens"] == tokenizer.mask_id
    changed = out["tokens"] != tokens
    assert not changed[~chosen].any()
    np.testing.assert_array_equal(out["labels"], tokens)
    k = chosen.sum()
    p_mask, p_random_changed = masked[chosen].mean(), (changed & ~masked)[chosen].mean()
    assert abs(p_mask - 0.8) < 5 * np.sqrt(0.8 * 0.2 / k)
    # A random replacement equals the original with probability 1/256.
    expected_random = 0.1 * (1 - 1 / 256)
    assert abs(p_random_changed - expected_random) < 5 * np.sqrt(0.1 * 0.9 / k)
    randoms = out["tokens"][chosen & changed & ~masked]
    assert ((randoms >= 0) & (randoms < 256)).all()


def test_mlm_mask_max_predictions(rng):
    tokenizer = ByteTokenizer()
    tokens = rng.integers(0, 256, size=(200, 40)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    cap = 6  # ~0.15 · 40 = 6 chosen on average: the cap binds in about half the rows
    seed = int(rng.integers(2**32))
    uncapped = mlm_mask(tokens, valid, np.random.default_rng(seed), tokenizer=tokenizer)
    out = mlm_mask(tokens, valid, np.random.default_rng(seed), tokenizer=tokenizer,
                   max_predictions=cap)
    chosen, before = out["weights"] > 0, uncapped["weights"] > 0
    counts = chosen.sum(-1)
    np.testing.assert_array_equal(counts, np.minimum(before.sum(-1), cap))
    assert not (chosen & ~before).any()  # the kept ones are a subset of the drawn ones
    assert (before.sum(-1) > cap).sum() > 20  # the cap was exercised
    assert not (out["tokens"] != tokens)[~chosen].any()  # dropped choices stay unchanged
    # The list: the chosen positions in ascending order, then (0, weight 0) padding.
    assert out["predict_positions"].shape == out["predict_weights"].shape == (200, cap)
    for row in range(200):
        real = out["predict_weights"][row] > 0
        np.testing.assert_array_equal(out["predict_positions"][row][real],
                                      np.flatnonzero(chosen[row]))
        assert real.sum() == counts[row] and not out["predict_positions"][row][~real].any()
    # Which of a row's drawn tokens survive does not depend on position: the first and
    # the second half keep the same share (~0.8 each, ± 0.02; keeping the first 6 drawn
    # would give ~0.95 against ~0.65).
    first, second = (chosen[:, half].sum() / before[:, half].sum()
                     for half in (slice(0, 20), slice(20, 40)))
    assert abs(first - second) < 0.1, (first, second)
    # A list longer than the window is padded.
    wide = mlm_mask(tokens[:3, :4], valid[:3, :4], rng, tokenizer=tokenizer, probability=1.0,
                    max_predictions=6)
    np.testing.assert_array_equal(wide["predict_weights"], [[1, 1, 1, 1, 0, 0]] * 3)
    np.testing.assert_array_equal(wide["predict_positions"], [[0, 1, 2, 3, 0, 0]] * 3)
    with pytest.raises(ValueError, match="max_predictions must be a non-negative int"):
        mlm_mask(tokens, valid, rng, tokenizer=tokenizer, max_predictions=-1)


def test_prediction_list_pads_and_truncates():
    chosen = np.array([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    out = prediction_list(chosen, 3)
    np.testing.assert_array_equal(out["predict_positions"], [[1, 3, 4], [0, 0, 0], [0, 1, 2]])
    np.testing.assert_array_equal(out["predict_weights"], [[1, 1, 1], [0, 0, 0], [1, 1, 1]])
    wide = prediction_list(chosen[:1], 7)
    np.testing.assert_array_equal(wide["predict_positions"], [[1, 3, 4, 0, 0, 0, 0]])
    np.testing.assert_array_equal(wide["predict_weights"], [[1, 1, 1, 0, 0, 0, 0]])


def test_mlm_max_predictions_batches_train_split_only(data_dir, text_corpus):
    config = _lm_config(data_dir, text_corpus, task="mlm", seq_len=32, batch_size=8,
                        mlm_max_predictions=8)
    batch = next(make_dataset(config, "train", process_index=0, process_count=1))
    assert batch["predict_positions"].shape == batch["predict_weights"].shape == (8, 8)
    assert (batch["weights"].sum(-1) <= 8).all()
    np.testing.assert_array_equal(batch["predict_weights"].sum(-1), batch["weights"].sum(-1))
    eval_batch = next(make_dataset(config, "eval", process_index=0, process_count=1))
    assert "predict_positions" not in eval_batch  # evaluation scores every chosen token
    config["mlm_max_predictions"] = -2
    with pytest.raises(ValueError, match="`mlm_max_predictions`: expected a non-negative int"):
        make_dataset(config, "train", process_index=0, process_count=1)


def test_mlm_batches(data_dir, text_corpus):
    config = _lm_config(data_dir, text_corpus, task="mlm", seq_len=32, batch_size=8)
    batch = next(make_dataset(config, "train", process_index=0, process_count=1))
    assert {k: v.shape for k, v in batch.items()} == {
        "tokens": (8, 32), "labels": (8, 32), "weights": (8, 32), "valid": (8, 32)}
    chosen = batch["weights"] > 0
    assert chosen.any()
    np.testing.assert_array_equal(batch["tokens"][~chosen], batch["labels"][~chosen])


def test_same_seed_same_batches_other_seed_other_batches(data_dir, text_corpus):
    def batches(seed, task="lm"):
        config = _lm_config(data_dir, text_corpus, seed=seed, task=task, num_threads=2)
        return _take(make_dataset(config, "train", process_index=0, process_count=1), 4)

    _assert_same(batches(7), batches(7))
    _assert_same(batches(7, "mlm"), batches(7, "mlm"))
    a, b = batches(7), batches(8)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("task", ["lm", "mlm"])
def test_lm_state_restores_the_next_batches(data_dir, text_corpus, task):
    config = _lm_config(data_dir, text_corpus, task=task, num_threads=2, seq_len=64)
    it = make_dataset(config, "train", process_index=0, process_count=1)
    _take(it, 7)  # past several documents and epochs' worth of windows
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 6)
    fresh = make_dataset(config, "train", process_index=0, process_count=1)
    fresh.set_state(state)
    _assert_same(_take(fresh, 6), expected)
    with pytest.raises(ValueError, match="iterator state is for"):
        make_dataset(config, "train", process_index=1, process_count=2).set_state(state)


def test_config_errors(data_dir, text_corpus):
    base = _lm_config(data_dir, text_corpus)
    with pytest.raises(ValueError, match=r"`sequence_length`: not a data field"):
        make_dataset({**base, "sequence_length": 3}, "train", process_index=0, process_count=1)
    with pytest.raises(ValueError, match="`task`: expected one of"):
        make_dataset({**base, "task": "seq2seq"}, "train", process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        make_dataset(base, "train", process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"needs eval_batches"):
        make_dataset(base, "eval", process_index=0, process_count=2)
    with pytest.raises(ValueError, match="split must be"):
        make_dataset(base, "test", process_index=0, process_count=1)


def test_data_config_drives_make_dataset(data_dir, text_corpus):
    config = DataConfig(**_lm_config(data_dir, text_corpus))
    assert config.manual_dir is None and config.task == "lm"
    batch = next(make_dataset(config, "train", process_index=0, process_count=1))
    assert batch["tokens"].shape == (4, 17)


# ----------------------------------------------------------------------------- NER


def _raw_spans(record, types):
    return sorted((types.index(label), s, e) for label, entities in record["label"].items()
                  for positions in entities.values() for s, e in positions)


def test_ner_batches_match_raw_json(data_dir, cluener_subset):
    n = 56
    it = make_dataset(_ner_config(data_dir, cluener_subset), "eval",
                      process_index=0, process_count=1)
    meta = it.metadata
    assert meta.num_types == 10 and meta.type_names[0] == "address"
    with open(os.path.join(cluener_subset, "dev.jsonl"), encoding="utf-8") as f:
        records = {json.loads(line)["text"][:n]: json.loads(line) for line in f}
    vocab = CharTokenizer.load(os.path.join(
        make_builder("cluener", data_dir, manual_dir=cluener_subset).data_dir,
        "char_vocab.train.text.min1.json"))
    assert vocab.chars == it.tokenizer.chars  # saved next to the data
    rows = 0
    for batch in it:
        for i in range(len(batch["tokens"])):
            if batch["example_weights"][i] == 0:
                assert not batch["valid"][i].any() and (batch["spans"][i] == -1).all()
                continue
            rows += 1
            length = int(batch["valid"][i].sum())
            prefix = it.tokenizer.decode(batch["tokens"][i][:length])
            record = next(r for t, r in records.items()
                          if len(t) == length and all(a == b or a == "\ufffd"
                                                      for a, b in zip(prefix, t, strict=True)))
            spans = sorted({s for s in _raw_spans(record, meta.type_names) if s[2] < n})
            got = batch["spans"][i]
            assert batch["spans"].dtype == np.int32 and got.shape == (32, 3)
            assert [tuple(r) for r in got[:len(spans)].tolist()] == spans
            assert (got[len(spans):] == -1).all()
            types = np.zeros(10, np.int32)
            types[[t for t, _, _ in spans]] = 1
            np.testing.assert_array_equal(batch["type_labels"][i], types)
    assert rows == len(records) == 90


def test_two_processes_split_the_examples(data_dir, cluener_subset):
    def texts(process_index):
        it = make_dataset(_ner_config(data_dir, cluener_subset, batch_size=4), "train",
                          process_index=process_index, process_count=2)
        count = it.metadata.num_examples
        batches = _take(it, -(-count // 2))
        tokens = np.concatenate([b["tokens"] for b in batches])[:count]
        return [it.tokenizer.decode(row) for row in tokens], count

    (first, n0), (second, n1) = texts(0), texts(1)
    assert n0 + n1 == 400 and abs(n0 - n1) <= 1
    with open(os.path.join(cluener_subset, "train.jsonl"), encoding="utf-8") as f:
        everything = collections.Counter(json.loads(line)["text"][:56] for line in f)
    assert collections.Counter(first) + collections.Counter(second) == everything


def test_max_examples_trims_the_training_split_only(data_dir, cluener_subset):
    """A small training subset is scored on the whole dev set; `eval_batches` shortens it."""
    config = _ner_config(data_dir, cluener_subset, max_examples=24, batch_size=16,
                         shuffle=False)
    train = make_dataset(config, "train", process_index=0, process_count=1)
    assert train.metadata.num_examples == 24
    seen = np.concatenate([b["tokens"] for b in _take(train, 3)])[:48]
    np.testing.assert_array_equal(seen[24:], seen[:24])  # the 24 sentences, repeated
    untrimmed = make_dataset(dict(config, max_examples=0), "train", process_index=0,
                             process_count=1)
    assert untrimmed.metadata.num_examples == 400
    np.testing.assert_array_equal(seen[:24], np.concatenate(
        [b["tokens"] for b in _take(untrimmed, 2)])[:24])  # the split's first 24

    full_pass = list(make_dataset(_ner_config(data_dir, cluener_subset, batch_size=16),
                                  "eval", process_index=0, process_count=1))
    dev = make_dataset(config, "eval", process_index=0, process_count=1)
    assert dev.metadata.num_examples == 90
    trimmed_config = list(dev)
    assert int(sum(b["example_weights"].sum() for b in trimmed_config)) == 90
    _assert_same(trimmed_config, full_pass)
    short = list(make_dataset(dict(config, eval_batches=2), "eval", process_index=0,
                              process_count=1))
    _assert_same(short, full_pass[:2])


def test_eval_shards_yield_equal_batch_counts(data_dir, cluener_subset):
    counts = []
    real = 0
    for process_index in range(2):
        it = make_dataset(_ner_config(data_dir, cluener_subset, task="multilabel",
                                      batch_size=16), "eval",
                          process_index=process_index, process_count=2)
        batches = list(it)
        counts.append(len(batches))
        assert all(b["tokens"].shape == (8, 56) for b in batches)
        real += int(sum(b["example_weights"].sum() for b in batches))
    assert counts[0] == counts[1] == 6 and real == 90  # 45 per process, 8 per batch


def test_ner_state_restores_the_next_batches(data_dir, cluener_subset):
    config = _ner_config(data_dir, cluener_subset, num_threads=2, batch_size=16)
    it = make_dataset(config, "train", process_index=1, process_count=2)
    _take(it, 30)  # crosses an epoch (200 examples per process, 8 per batch)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 5)
    fresh = make_dataset(config, "train", process_index=1, process_count=2)
    fresh.set_state(state)
    _assert_same(_take(fresh, 5), expected)
    other = make_dataset({**config, "seed": 6}, "train", process_index=1, process_count=2)
    assert not np.array_equal(next(other)["tokens"], _take(
        make_dataset(config, "train", process_index=1, process_count=2), 1)[0]["tokens"])


def test_ner_rejects_too_many_spans_before_the_first_batch(data_dir, cluener_subset):
    with pytest.raises(ValueError, match=r"cluener/validation: the record on line \d+ of its "
                                         r"source file has \d+ entity spans .* more than "
                                         r"data\.max_spans=1: set --config\.data\.max_spans="):
        make_dataset(_ner_config(data_dir, cluener_subset, max_spans=1), "eval",
                     process_index=0, process_count=1)
