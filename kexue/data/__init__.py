"""TFDS builders in `array_record` format (read without TensorFlow) and Grain pipelines.

    from kexue.data import make_dataset
    train = make_dataset(DataConfig(name="cluener", task="ner", tokenizer="char"), "train")
    batch = next(train)                      # dict of NumPy arrays, this process's rows
    train.metadata.vocab_size                # what the model needs to know
    state = train.get_state()                # JSON; train.set_state(state) resumes

* `sources`: `make_builder`, `prepare`, `load_catalog` (any TFDS catalog dataset),
  `default_cluener_dir`.
* `text_files`: the `TextFiles` builder (a glob of local files; default the stdlib).
* `cluener`: the `Cluener` builder (`cluener_config`: keyed on the manual files) and its
  checked line parser.
* `tokenizers`: `ByteTokenizer`, `CharTokenizer`.
* `wordpiece`: `WordPieceTokenizer` (BERT `vocab.txt`, character offsets),
  `char_to_token_spans`, `token_to_char_spans`.
* `pipeline`: `DataConfig`, `make_dataset`, `DataIterator`, `DatasetMetadata`, LM windows, MLM
  masking, NER examples with their gold span rows.
"""

import importlib
from typing import Any

from kexue.data.tokenizers import SPECIAL_TOKENS, ByteTokenizer, CharTokenizer, Tokenizer
from kexue.data.wordpiece import WordPieceTokenizer, char_to_token_spans, token_to_char_spans

# The TFDS / Grain modules load on first use, so the tokenizers (and `kexue.load`)
# work without the `data` extra: name -> module.
_LAZY = {
    **dict.fromkeys(("CLUENER_TYPES", "CLUENER_URL", "Cluener", "MalformedRecordError",
                     "cluener_config", "cluener_files", "parse_cluener_line",
                     "read_cluener_file"), "kexue.data.cluener"),
    **dict.fromkeys(("DATA_FIELDS", "TASKS", "TOKENIZERS", "DataConfig", "DataIterator",
                     "DatasetMetadata", "make_dataset", "make_tokenizer", "mlm_mask", "ner_example",
                     "prediction_list", "token_offsets"), "kexue.data.pipeline"),
    **dict.fromkeys(("default_cluener_dir", "load_catalog", "make_builder", "prepare"),
                    "kexue.data.sources"),
    **dict.fromkeys(("TextFiles", "default_text_glob", "held_out_start", "list_text_files",
                     "text_files_config"), "kexue.data.text_files"),
}
_SUBMODULES = ("cluener", "pipeline", "sources", "text_files")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"kexue.data.{name}")
    raise AttributeError(f"module 'kexue.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


__all__ = [
    "CLUENER_TYPES",
    "CLUENER_URL",
    "DATA_FIELDS",
    "SPECIAL_TOKENS",
    "TASKS",
    "TOKENIZERS",
    "ByteTokenizer",
    "CharTokenizer",
    "Cluener",
    "DataConfig",
    "DataIterator",
    "DatasetMetadata",
    "MalformedRecordError",
    "TextFiles",
    "Tokenizer",
    "WordPieceTokenizer",
    "char_to_token_spans",
    "cluener_config",
    "cluener_files",
    "default_cluener_dir",
    "default_text_glob",
    "held_out_start",
    "list_text_files",
    "load_catalog",
    "make_builder",
    "make_dataset",
    "make_tokenizer",
    "mlm_mask",
    "ner_example",
    "parse_cluener_line",
    "prediction_list",
    "prepare",
    "read_cluener_file",
    "text_files_config",
    "token_offsets",
    "token_to_char_spans",
]
