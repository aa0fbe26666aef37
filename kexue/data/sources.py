"""Building TFDS datasets in `array_record` format and opening them as random-access sources.

One path serves every dataset: `make_builder` (a kexue builder or any TFDS catalog
name), `prepare` (build once; later calls find the files) and `builder.as_data_source`.
Reading goes through TFDS's NumPy decoders, so TensorFlow is never imported;
features that need TensorFlow to decode (rare in text datasets) are not supported.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import logging as absl_logging

from kexue.data.cluener import Cluener
from kexue.data.text_files import DEFAULT_EXCLUDE, TextFiles, text_files_config

__all__ = [
    "default_cluener_dir",
    "load_catalog",
    "make_builder",
    "prepare",
    "repo_root",
]


def repo_root() -> str:
    """The directory holding the `kexue` package (the repository root in a checkout)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_cluener_dir() -> str | None:
    """`<repo>/../shared/data/cluener` if it holds `train.jsonl`, else None (download)."""
    path = os.path.normpath(os.path.join(repo_root(), "..", "shared", "data", "cluener"))
    return path if os.path.isfile(os.path.join(path, "train.jsonl")) else None


#: TFDS log lines that mislead about kexue's own builders: a builder config made per
#: corpus is not "custom", and a variant folder TFDS is about to fill lacks its info.
_TFDS_NOISE = ("Using custom data configuration", "has no dataset_info.json")


class _DropTfdsNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _TFDS_NOISE)


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    """Drops `_TFDS_NOISE` from the absl logger (TFDS logs there) inside the block."""
    noise = _DropTfdsNoise()
    logger = absl_logging.get_absl_logger()
    logger.addFilter(noise)
    try:
        yield
    finally:
        logger.removeFilter(noise)


def make_builder(
    name: str,
    data_dir: str | None = None,
    *,
    pattern: str | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    eval_fraction: float = 0.05,
    skip_bad_records: bool = False,
) -> tfds.core.DatasetBuilder:
    """A builder writing `array_record` files under `data_dir` (None: TFDS's default).

    Args:
      name: "text_files", "cluener", or any TFDS catalog name (with optional
        "/config:version", e.g. "tiny_shakespeare" or "lm1b").
      data_dir: where built datasets live.
      pattern, exclude, eval_fraction: the files of "text_files" (see
        `text_files_config`); ignored otherwise.
      skip_bad_records: for "cluener", skip and count malformed records.
    """
    if name == "text_files":
        config = text_files_config(pattern, exclude=exclude, eval_fraction=eval_fraction)
        # TFDS wants the registered object itself when the name is a registered config.
        config = TextFiles.builder_configs.get(config.name, config)
        with quiet_tfds():
            return TextFiles(config=config, data_dir=data_dir, file_format="array_record")
    if name == "cluener":
        config = "skip_bad_records" if skip_bad_records else "strict"
        with quiet_tfds():
            return Cluener(config=config, data_dir=data_dir, file_format="array_record")
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")


def prepare(
    builder: tfds.core.DatasetBuilder, *, manual_dir: str | None = None, download: bool = True
) -> tfds.core.DatasetBuilder:
    """Builds the dataset unless its files exist; returns the builder.

    Args:
      builder: from `make_builder`.
      manual_dir: directory with manually downloaded files (CLUENER's JSON lines).
        Must exist when given; when None a builder downloads what it needs.
      download: False raises instead of building a dataset that is not there.
    """
    if manual_dir is not None and not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"manual_dir {manual_dir!r} is not a directory")
    with quiet_tfds():
        if builder.is_prepared():
            return builder
    if not download:
        raise FileNotFoundError(
            f"{builder.name} is not built under {builder.data_dir} and download=False"
        )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    with quiet_tfds():
        builder.download_and_prepare(download_config=download_config)
    return builder


def load_catalog(
    name: str, split: str, data_dir: str | None = None, *, download: bool = True
) -> Any:
    """A random-access source (`len`, `[i]` -> dict of NumPy values) of any TFDS dataset.

    Same path as the kexue builders: `make_builder(name)`, `prepare`, then
    `as_data_source(split)`; `split` may use TFDS slicing ("train[:10%]").
    """
    builder = prepare(make_builder(name, data_dir), download=download)
    return builder.as_data_source(split=split)
