"""`data.rare_types` / `data.type_keep_fraction`: a controlled class imbalance (CLUENER).

A synthetic 20-sentence training file: 6 sentences with a movie, 3 with a book, 1
with both and 10 with a name only, so 10 sentences hold a "rare" type.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from kexue.data import make_dataset


def _line(text: str, types: list[str]) -> str:
    # every entity is the first three characters of the sentence
    return json.dumps({"text": text, "label": {t: {text[:3]: [[0, 2]]} for t in types}},
                      ensure_ascii=False)


TRAIN = ([(f"m{i:02d} 看电影", ["movie"]) for i in range(6)]
         + [(f"b{i:02d} 读书", ["book"]) for i in range(6, 9)]
         + [("x09 电影和书", ["movie", "book"])]
         + [(f"n{i:02d} 张三", ["name"]) for i in range(10, 20)])
HOLDING = {text for text, types in TRAIN if {"movie", "book"} & set(types)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[str, str]:
    manual = tmp_path_factory.mktemp("cluener_synthetic")
    (manual / "train.jsonl").write_text("".join(_line(t, ty) + "\n" for t, ty in TRAIN),
                                        encoding="utf-8")
    dev = [("d00 电影", ["movie"]), ("d01 书", ["book"]), ("d02 人", ["name"])]
    (manual / "dev.jsonl").write_text("".join(_line(t, ty) + "\n" for t, ty in dev),
                                      encoding="utf-8")
    return str(manual), str(tmp_path_factory.mktemp("tfds_synthetic"))


def _config(synthetic, **overrides):
    manual, data_dir = synthetic
    config = dict(name="cluener", task="multilabel", tokenizer="char", data_dir=data_dir,
                  manual_dir=manual, seq_len=16, batch_size=1, num_threads=0, seed=0,
                  shuffle=False)
    config.update(overrides)
    return config


def _train_texts(synthetic, **overrides) -> list[str]:
    it = make_dataset(_config(synthetic, **overrides), "train", process_index=0,
                      process_count=1)
    texts = []
    for _ in range(it.metadata.num_examples):  # one epoch, in file order (no shuffle)
        batch = next(it)
        length = int(batch["valid"][0].sum())
        texts.append(it.tokenizer.decode(batch["tokens"][0][:length]))
    return texts


@pytest.mark.parametrize(("fraction", "kept"), [(1.0, 10), (0.3, 3), (0.25, 3), (0.0, 0)])
def test_keeps_exactly_the_rounded_share_of_rare_type_sentences(synthetic, fraction, kept):
    texts = _train_texts(synthetic, rare_types="movie, book", type_keep_fraction=fraction)
    assert len(texts) == 10 + kept  # 0.25 · 10 = 2.5 rounds up to 3
    assert len(HOLDING.intersection(texts)) == kept
    everything = _train_texts(synthetic)  # in the stored (TFDS) order
    assert sorted(everything) == sorted(t for t, _ in TRAIN)
    assert [t for t in texts if t not in HOLDING] == [t for t in everything
                                                      if t not in HOLDING]
    assert texts == [t for t in everything if t in texts]  # the order is kept


def test_the_rare_types_become_rare_in_the_labels(synthetic):
    it = make_dataset(_config(synthetic, rare_types="movie,book", type_keep_fraction=0.2),
                      "train", process_index=0, process_count=1)
    names = it.metadata.type_names
    labels = np.stack([next(it)["type_labels"][0] for _ in range(it.metadata.num_examples)])
    counts = dict(zip(names, labels.sum(0).tolist(), strict=True))
    assert counts["name"] == 10 and counts["movie"] + counts["book"] in (2, 3, 4)
    assert it.metadata.num_examples == 12


def test_same_seed_same_sentences_other_seeds_differ(synthetic):
    chosen = {seed: tuple(_train_texts(synthetic, rare_types="movie,book",
                                       type_keep_fraction=0.3, seed=seed))
              for seed in (0, 0, 1, 2, 3)}
    assert chosen[0] == tuple(_train_texts(synthetic, rare_types="movie,book",
                                           type_keep_fraction=0.3, seed=0))
    assert len(set(chosen.values())) > 1  # 120 possible subsets; 4 seeds give >1


def test_one_rare_type_and_the_eval_split_is_never_filtered(synthetic):
    texts = _train_texts(synthetic, rare_types="book", type_keep_fraction=0.0)
    assert len(texts) == 16 and not any(t.startswith(("b", "x")) for t in texts)
    it = make_dataset(_config(synthetic, rare_types="book", type_keep_fraction=0.0), "eval",
                      process_index=0, process_count=1)
    assert it.metadata.num_examples == 3


def test_applies_after_max_examples(synthetic):
    first = _train_texts(synthetic)[:8]
    holding = len(HOLDING.intersection(first))
    texts = _train_texts(synthetic, max_examples=8, rare_types="movie,book",
                         type_keep_fraction=0.5)
    assert set(texts) <= set(first)
    assert len(texts) == 8 - holding + (holding + 1) // 2  # halves rounded up


@pytest.mark.parametrize(("overrides", "message"), [
    ({"type_keep_fraction": 1.5, "rare_types": "movie"},
     r"`type_keep_fraction`: expected a number in \[0, 1\]; got 1\.5"),
    ({"type_keep_fraction": "half", "rare_types": "movie"}, r"`type_keep_fraction`"),
    ({"type_keep_fraction": 0.5}, r"`rare_types`: `type_keep_fraction` = 0\.5 < 1 needs"),
    ({"rare_types": "movie,film"}, r"`rare_types`: expected entity types .*unknown \['film'\]"),
    ({"rare_types": "movie,movie"}, r"`rare_types`: expected each type once"),
    ({"rare_types": ("movie",)}, r"`rare_types`: expected a comma-separated string"),
    ({"task": "lm", "name": "text_files", "tokenizer": "byte", "rare_types": "movie"},
     r"`rare_types`: needs name='cluener'"),
])
def test_bad_values_name_the_field(synthetic, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_dataset(_config(synthetic, **overrides), "train", process_index=0,
                     process_count=1)
