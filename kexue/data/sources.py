"""Building TFDS datasets in `array_record` format and opening them as random-access sources.

One path serves every dataset: `make_builder` (a kexue builder or any TFDS catalog
name), `prepare` (build once; later calls find the files) and `builder.as_data_source`.
Reading goes through TFDS's NumPy decoders, so TensorFlow is never imported;
features that need TensorFlow to decode (rare in text datasets) are not supported.

The kexue builders' configs are named after the files that make them
(`text_files_config`, `cluener_config`), so a changed source is built afresh and a
prepared dataset is never served for other files. `prepare(..., rebuild=True)` builds
again in any case (once per process and dataset).

Downloads fail fast offline: before TFDS fetches a URL (it retries for minutes), the
URL's host (or the HTTPS proxy) is probed with a 5 s limit, and an unreachable one
raises `ConnectionError` naming `data.manual_dir` / `data.data_dir`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import logging as absl_logging

from kexue.data.cluener import CLUENER_URL, Cluener, cluener_config
from kexue.data.text_files import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_EXCLUDE,
    TextFiles,
    text_files_config,
)

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


#: Where `default_cluener_dir` looks, in order, relative to the repository root: the
#: repository's own ignored copy (what travels with it, e.g. to a GPU machine without
#: network) and the project machine's shared copy beside the repository.
CLUENER_DIRS = (os.path.join(".data", "cluener"), os.path.join("..", "shared", "data", "cluener"))


def default_cluener_dir() -> str | None:
    """The first of `<repo>/.data/cluener` and `<repo>/../shared/data/cluener` that holds
    `train.jsonl`, else None (download)."""
    for relative in CLUENER_DIRS:
        path = os.path.normpath(os.path.join(repo_root(), relative))
        if os.path.isfile(os.path.join(path, "train.jsonl")):
            return path
    return None


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
    manual_dir: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tfds.core.DatasetBuilder:
    """A builder writing `array_record` files under `data_dir` (None: TFDS's default).

    Args:
      name: "text_files", "cluener", or any TFDS catalog name (with optional
        "/config:version", e.g. "tiny_shakespeare" or "lm1b").
      data_dir: where built datasets live.
      pattern, exclude, eval_fraction, chunk_bytes: the files of "text_files" (see
        `text_files_config`); ignored otherwise.
      skip_bad_records: for "cluener", skip and count malformed records.
      manual_dir: for "cluener", the directory of its JSON-lines files (None: the
        official download); pass the same to `prepare`.

    Raises:
      ValueError: "text_files" matches no file.
      FileNotFoundError: "cluener" with a `manual_dir` lacking a train or dev file.
    """
    if name == "text_files":
        config = text_files_config(pattern, exclude=exclude, eval_fraction=eval_fraction,
                                   chunk_bytes=chunk_bytes)
        with quiet_tfds():
            return TextFiles(config=config, data_dir=data_dir, file_format="array_record")
    if name == "cluener":
        config = cluener_config(manual_dir, skip_bad_records=skip_bad_records)
        with quiet_tfds():
            return Cluener(config=config, data_dir=data_dir, file_format="array_record")
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")


# Datasets (their `data_dir`) this process rebuilt: `rebuild=True` rebuilds once.
_REBUILT: set[str] = set()
PROBE_TIMEOUT_S = 5.0


def _proxy_for(scheme: str) -> str | None:
    for key in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if os.environ.get(key):
            return os.environ[key]
    return None


def _probe(url: str) -> str | None:
    """None if a TCP connection to `url`'s host (or its proxy) opens within
    `PROBE_TIMEOUT_S` (name resolution included), else the reason."""
    parsed = urllib.parse.urlparse(url)
    target = urllib.parse.urlparse(_proxy_for(parsed.scheme) or url)
    host = target.hostname
    if not host:
        return None  # not a network URL (e.g. a local path): nothing to probe
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{host}:{port}: {error.strerror or error}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return outcome[0] if outcome else f"{host}:{port}: no answer in {PROBE_TIMEOUT_S:.0f} s"


def _urls(tree: Any) -> list[str]:
    if isinstance(tree, str):
        return [tree]
    if isinstance(tree, dict):
        return [url for value in tree.values() for url in _urls(value)]
    if isinstance(tree, list | tuple):
        return [url for value in tree for url in _urls(value)]
    url = getattr(tree, "url", None)
    return [url] if isinstance(url, str) else []


def _failing_fast_offline(builder: tfds.core.DatasetBuilder, hint: str) -> None:
    """Makes `builder`'s download manager probe each URL's host before downloading."""
    make = builder._make_download_manager
    reachable: set[str] = set()

    def checked(fetch):
        def fetch_checked(url_or_urls, *args, **kwargs):
            for url in _urls(url_or_urls):
                host = urllib.parse.urlparse(url).netloc
                if host in reachable:
                    continue
                reason = _probe(url)
                if reason is not None:
                    raise ConnectionError(f"cannot download {url} for {builder.name} "
                                          f"(network unreachable: {reason}). {hint}")
                reachable.add(host)
            return fetch(url_or_urls, *args, **kwargs)
        return fetch_checked

    def make_checked(*args, **kwargs):
        manager = make(*args, **kwargs)
        for method in ("download", "download_and_extract"):
            setattr(manager, method, checked(getattr(manager, method)))
        return manager

    builder._make_download_manager = make_checked


def prepare(
    builder: tfds.core.DatasetBuilder, *, manual_dir: str | None = None, download: bool = True,
    rebuild: bool = False,
) -> tfds.core.DatasetBuilder:
    """Builds the dataset unless its files exist; returns the builder.

    Args:
      builder: from `make_builder`.
      manual_dir: directory with manually downloaded files (CLUENER's JSON lines).
        Must exist when given; when None a builder downloads what it needs.
      download: False raises instead of building a dataset that is not there.
      rebuild: build again even if the files exist (the first call in a process for
        this dataset; later calls reuse that build).

    Raises:
      FileNotFoundError: `manual_dir` is not a directory, or the dataset is not built
        and `download` is False.
      ConnectionError: a download is needed and its host is unreachable (within about
        5 s, not TFDS's minutes of retries); the message names `data.manual_dir`.
    """
    if manual_dir is not None and not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"data.manual_dir={manual_dir} is not a directory")
    rebuild = rebuild and os.fspath(builder.data_dir) not in _REBUILT
    with quiet_tfds():
        if builder.is_prepared() and not rebuild:
            return builder
    if not download:
        raise FileNotFoundError(
            f"{builder.name} is not built under {builder.data_dir} and download=False"
        )
    if isinstance(builder, Cluener):
        hint = (f"Offline? Download {CLUENER_URL} elsewhere, unpack train.json and dev.json "
                "into a directory and pass --config.data.manual_dir=DIR")
    else:
        hint = (f"Offline? Prepare it on a machine with network access and copy it into "
                f"data.data_dir ({builder.data_dir_root}); for datasets built from manually "
                "downloaded files, pass their directory as data.manual_dir")
    _failing_fast_offline(builder, hint)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if rebuild
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
    with quiet_tfds():
        builder.download_and_prepare(download_config=download_config)
    if rebuild:
        _REBUILT.add(os.fspath(builder.data_dir))
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
