"""CLUENER: the line parser against raw JSON, malformed records, the builder, fuzzing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kexue.data import (
    CLUENER_TYPES,
    MalformedRecordError,
    load_catalog,
    make_builder,
    make_dataset,
    parse_cluener_line,
    prepare,
    read_cluener_file,
)
from kexue.data.cluener import SkippedRecords
from tests.data.conftest import cluener_lines, requires_cluener

GOOD = {"text": "浙商银行叶老桂", "label": {"company": {"浙商银行": [[0, 3]]},
                                            "name": {"叶老桂": [[4, 6]]}}}


def _spans_from_raw(record: dict) -> list[tuple[int, int, int]]:
    """Independent reading of a raw record: (type index, start, end) per listed span."""
    spans = []
    for label, entities in record["label"].items():
        for positions in entities.values():
            spans.extend((CLUENER_TYPES.index(label), s, e) for s, e in positions)
    return sorted(spans)


@requires_cluener
@pytest.mark.parametrize("split", ["train", "dev"])
def test_parse_matches_raw_json(split, rng):
    lines = cluener_lines(split, 1343)
    for index in rng.choice(len(lines), size=200, replace=False):
        record = json.loads(lines[index])
        text, spans = parse_cluener_line(lines[index])
        assert text == record["text"]
        assert spans == _spans_from_raw(record)
        for type_index, start, end in spans:
            entity = text[start:end + 1]
            assert entity in record["label"][CLUENER_TYPES[type_index]]


def _line(record) -> str:
    return json.dumps(record, ensure_ascii=False)


_COMPANY = "浙商银行"


def _company(spans, entity=_COMPANY, label="company") -> str:
    return _line({"text": _COMPANY, "label": {label: {entity: spans}}})


BAD_LINES = [
    ('{"text": "abc", "label": {', "bad JSON"),
    (_company([[0, 4]]), "outside the text"),
    (_company([[-1, 3]]), "outside the text"),
    (_company([[0, 2]], entity="浙商"), "span text mismatch"),
    (_company([[0, 3]], label="bank"), "unknown label 'bank'"),
    (_company([[0, 3.0]]), r"not \[start, end\]"),
    (_company([0, 3]), r"not \[start, end\]"),
    (_line({"text": "", "label": {}}), "'text' must be a non-empty string"),
    (_line({"text": "abc"}), "'label' must be an object"),
    (_line([1, 2]), "expected a JSON object"),
    ("", "empty line"),
]


@pytest.mark.parametrize("bad, problem", BAD_LINES)
def test_malformed_record_names_file_line_and_problem(tmp_path, bad, problem):
    path = tmp_path / "train.jsonl"
    good = _line(GOOD)
    path.write_text(f"{good}\n{good}\n{bad}\n{good}\n", encoding="utf-8")
    with pytest.raises(MalformedRecordError, match=problem) as caught:
        list(read_cluener_file(path))
    assert caught.value.path == str(path) and caught.value.line == 3
    assert str(caught.value).startswith(f"{path}:3: ")


def test_non_utf8_and_empty_files(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_bytes(_line(GOOD).encode() + b"\n" + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(MalformedRecordError, match=r"dev.jsonl:2: not valid UTF-8"):
        list(read_cluener_file(path))
    path.write_bytes(b"")
    with pytest.raises(MalformedRecordError, match=r"dev.jsonl:1: file is empty"):
        list(read_cluener_file(path, skip_bad_records=True, skipped=SkippedRecords()))


def test_skip_mode_counts_every_bad_record(tmp_path):
    path = tmp_path / "train.jsonl"
    good = _line(GOOD)
    bad = [line for line, _ in BAD_LINES]
    path.write_text("\n".join([good, *bad, good]) + "\n", encoding="utf-8")
    skipped = SkippedRecords()
    records = list(read_cluener_file(path, skip_bad_records=True, skipped=skipped))
    assert [number for number, _, _ in records] == [1, len(bad) + 2]
    assert skipped.count == len(bad)
    assert [p.split(":")[1] for p in skipped.problems] == [str(i + 2) for i in range(len(bad))]


def _write_manual(directory, train: list[str], dev: list[str]) -> str:
    directory.mkdir()
    (directory / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (directory / "dev.jsonl").write_text("\n".join(dev) + "\n", encoding="utf-8")
    return str(directory)


def test_builder_stops_or_skips_and_reports(tmp_path):
    good = _line(GOOD)
    manual = _write_manual(tmp_path / "manual", [good, good, BAD_LINES[4][0], good], [good])
    with pytest.raises(ValueError, match=r"train.jsonl:3: unknown label 'bank'"):
        prepare(make_builder("cluener", str(tmp_path / "strict")), manual_dir=manual)

    data_dir = str(tmp_path / "skip")
    builder = prepare(make_builder("cluener", data_dir, skip_bad_records=True),
                      manual_dir=manual)
    assert len(builder.as_data_source("train")) == 3
    report = builder.info.metadata["skipped_records"]["train"]
    assert report["count"] == 1 and "train.jsonl:3: unknown label" in report["problems"][0]
    config = {"name": "cluener", "task": "ner", "tokenizer": "char", "data_dir": data_dir,
              "manual_dir": manual, "skip_bad_records": True, "seq_len": 16,
              "batch_size": 2, "num_threads": 0}
    batches = make_dataset(config, "train", process_index=0, process_count=1)
    assert batches.metadata.skipped_records == 1  # read back from the stored metadata


def test_builder_refuses_missing_manual_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="manual_dir"):
        prepare(make_builder("cluener", str(tmp_path)), manual_dir=str(tmp_path / "nowhere"))


@requires_cluener
def test_built_examples_match_raw_lines(cluener_subset, data_dir, rng):
    builder = prepare(make_builder("cluener", data_dir), manual_dir=cluener_subset)
    raw = {"train": cluener_lines("train", 400), "validation": cluener_lines("dev", 90)}
    for split, lines in raw.items():
        source = builder.as_data_source(split)
        assert len(source) == len(lines)
        for index in rng.choice(len(source), size=40, replace=False):
            example = source[int(index)]
            record = json.loads(lines[example["line"] - 1])
            assert example["text"].decode("utf-8") == record["text"]
            spans = list(zip(example["span_type"].tolist(), example["span_start"].tolist(),
                             example["span_end"].tolist(), strict=True))
            assert spans == _spans_from_raw(record)
    # The catalog path (tfds.builder by registered name) reads the same files.
    catalog = load_catalog("cluener/strict", "validation", data_dir, download=False)
    assert len(catalog) == len(raw["validation"])


@requires_cluener
def test_manual_dir_with_official_json_names(tmp_path, cluener_subset):
    manual = tmp_path / "zip_layout" / "cluener_public"
    manual.mkdir(parents=True)
    shutil.copy(f"{cluener_subset}/train.jsonl", manual / "train.json")
    shutil.copy(f"{cluener_subset}/dev.jsonl", manual / "dev.json")
    builder = prepare(make_builder("cluener", str(tmp_path / "d")),
                      manual_dir=str(tmp_path / "zip_layout"))
    assert len(builder.as_data_source("validation")) == 90


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 60) | st.floats(allow_nan=True)
    | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["text", "label", *CLUENER_TYPES, "x"]) | st.text(max_size=3),
                      children, max_size=3),
    max_leaves=12,
)


def _mutated_records():
    def mutate(field, value):
        record = json.loads(json.dumps(GOOD))
        if field == "text":
            record["text"] = value
        elif field == "label":
            record["label"] = value
        elif field == "type":
            record["label"]["company"] = value
        else:
            record["label"]["company"]["浙商银行"] = value
        return json.dumps(record, ensure_ascii=False)

    return st.builds(mutate, st.sampled_from(["text", "label", "type", "spans"]), _json)


@given(st.one_of(st.binary(max_size=80), st.text(max_size=80), _json.map(json.dumps),
                 _mutated_records(), st.just("[" * 100_000)))
def test_fuzz_parser_raises_only_value_error(line):
    try:
        text, spans = parse_cluener_line(line)
    except ValueError:
        return
    for type_index, start, end in spans:
        assert 0 <= type_index < len(CLUENER_TYPES) and 0 <= start <= end < len(text)


def test_parser_keeps_valid_records_valid():
    text, spans = parse_cluener_line(_line(GOOD).encode("utf-8"))
    assert text == GOOD["text"]
    assert spans == [(CLUENER_TYPES.index("company"), 0, 3), (CLUENER_TYPES.index("name"), 4, 6)]
    np.testing.assert_array_equal(np.asarray(spans).shape, (2, 3))
