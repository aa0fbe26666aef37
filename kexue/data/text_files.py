"""A TFDS builder over any glob of local text files (default: the Python standard library).

Each file becomes one example `{"path": relative path, "content": raw bytes, "part": 0,
"parts": 1}`; a file longer than `chunk_bytes` (default 1 MiB) becomes `parts` examples
of at most `chunk_bytes` bytes each, cut at UTF-8 character boundaries, so no record,
and no element of an input pipeline, grows with the size of one file (the pipeline
puts the parts back together in order, `kexue.data.pipeline`). Files are split into
`train` and `validation` by a hash of their path relative to the glob's root, so the
held-out files are the same on every machine that has them and do not move when other
files are added. A glob that matches a single file holds out the file's tail instead:
its last `eval_fraction` of bytes, from the start of the line holding that point
(`held_out_start`), is the `validation` document and the rest the `train` one.

The builder config's name is a hash of the glob, the exclusions, the eval fraction,
`chunk_bytes` and the files it matches (relative path, size and modification time of
each), so a prepared dataset is used only for the files that made it: adding,
removing or rewriting a file gives a new name and a new build (an old one stays under
its own name until deleted). `prepare(..., rebuild=True)` rebuilds even when nothing
changed (a file rewritten with its size and modification time restored).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob as globlib
import hashlib
import itertools
import json
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_EXCLUDE",
    "TextFiles",
    "TextFilesConfig",
    "default_text_glob",
    "held_out_start",
    "list_text_files",
    "text_files_config",
]

DEFAULT_EXCLUDE: tuple[str, ...] = ("site-packages", "dist-packages")
DEFAULT_CHUNK_BYTES = 1 << 20


def default_text_glob() -> str:
    """`<stdlib>/**/*.py` for the running interpreter (`sysconfig.get_paths()["stdlib"]`)."""
    return os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")


def _glob_root(pattern: str) -> str:
    """The longest leading directory of `pattern` without glob magic."""
    parts = os.path.normpath(os.path.expanduser(pattern)).split(os.sep)
    root = []
    for part in parts[:-1]:
        if globlib.has_magic(part):
            break
        root.append(part)
    return os.sep.join(root) or "."


def _eval_score(relative_path: str) -> float:
    digest = hashlib.sha256(relative_path.encode("utf-8", errors="surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def list_text_files(
    pattern: str, *, exclude: Sequence[str] = DEFAULT_EXCLUDE, eval_fraction: float = 0.05
) -> dict[str, list[tuple[str, str]]]:
    """Files matching `pattern` (recursive `**`), split by path hash.

    Args:
      pattern: a glob; `**` matches any number of directories.
      exclude: fnmatch patterns; a file is dropped when any component of its
        relative path matches one.
      eval_fraction: share of files held out for `validation`, in [0, 1). With at
        least two files both splits get at least one.

    Returns:
      `{"train": [(relative_path, absolute_path), ...], "validation": [...]}`, sorted.

    Raises:
      ValueError: no file matches, or `eval_fraction` is out of range.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"`eval_fraction` must be in [0, 1), got {eval_fraction}")
    root = _glob_root(pattern)
    files = []
    for path in sorted(globlib.glob(os.path.expanduser(pattern), recursive=True)):
        if not os.path.isfile(path):
            continue
        relative = os.path.relpath(path, root)
        if any(fnmatch.fnmatch(part, rule) for part in relative.split(os.sep) for rule in exclude):
            continue
        files.append((_eval_score(relative), relative, os.path.abspath(path)))
    if not files:
        raise ValueError(f"no files match {pattern!r} (excluding {list(exclude)})")
    files.sort()
    num_eval = sum(score < eval_fraction for score, _, _ in files)
    if len(files) >= 2 and eval_fraction > 0:
        num_eval = min(max(num_eval, 1), len(files) - 1)
    splits = {"validation": files[:num_eval], "train": files[num_eval:]}
    return {split: sorted((rel, path) for _, rel, path in entries)
            for split, entries in splits.items()}


def files_fingerprint(splits: dict[str, list[tuple[str, str]]]) -> str:
    """SHA-256 (hex) of every listed file's split, relative path, size and mtime (ns)."""
    rows = []
    for split in sorted(splits):
        for relative, path in splits[split]:
            stat = os.stat(path)
            rows.append([split, relative, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(rows).encode("utf-8", "surrogateescape")).hexdigest()


def held_out_start(content: bytes, eval_fraction: float) -> int:
    """Where the held-out tail of a single-file corpus starts, a byte offset.

    The tail is the last `ceil(eval_fraction · size)` bytes, extended back to the
    start of the line holding its first byte (no line is split), unless that line is
    the first: then the cut stays at the byte. `eval_fraction = 0` holds out nothing
    (returns `size`).
    """
    size = len(content)
    target = size - math.ceil(eval_fraction * size)
    if target >= size:
        return size
    line_start = content.rfind(b"\n", 0, target) + 1
    return line_start if line_start > 0 else target


def _held_out_cut(path: str, size: int, eval_fraction: float, block: int = 1 << 16) -> int:
    """`held_out_start` of the file at `path`, reading backwards from the cut in blocks
    (never the whole file)."""
    target = size - math.ceil(eval_fraction * size)
    if target >= size:
        return size
    with open(path, "rb") as file:
        end = target
        while end > 0:
            start = max(0, end - block)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
    return target


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """Which files: `pattern` (glob), `exclude` (fnmatch on path parts), `eval_fraction`;
    `chunk_bytes` (longest record); `fingerprint` (`files_fingerprint` of the files)."""

    pattern: str = ""
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    eval_fraction: float = 0.05
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    fingerprint: str = ""


def text_files_config(
    pattern: str | None = None,
    *,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    eval_fraction: float = 0.05,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> TextFilesConfig:
    """A `TextFilesConfig` named after a hash of its fields and of the files it matches
    (`pattern` None: the stdlib).

    Raises:
      ValueError: no file matches, or `eval_fraction` / `chunk_bytes` is out of range.
    """
    pattern = os.path.abspath(os.path.expanduser(pattern or default_text_glob()))
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 16:
        raise ValueError(f"`chunk_bytes` must be an int >= 16, got {chunk_bytes!r}")
    fingerprint = files_fingerprint(list_text_files(pattern, exclude=exclude,
                                                    eval_fraction=eval_fraction))
    key = json.dumps([pattern, list(exclude), float(eval_fraction), chunk_bytes, fingerprint])
    name = "files_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return TextFilesConfig(
        name=name, pattern=pattern, exclude=tuple(exclude), eval_fraction=float(eval_fraction),
        chunk_bytes=chunk_bytes, fingerprint=fingerprint,
        description=f"{pattern} (excluding {list(exclude)}), {eval_fraction:.0%} held out",
    )


def _cuts(path: str, start: int, end: int, chunk_bytes: int) -> list[int]:
    """Offsets `start = c_0 < c_1 < ... < c_k = end` with parts of at most `chunk_bytes`
    bytes, each cut moved back (at most 3 bytes) to the start of a UTF-8 character."""
    cuts = [start]
    with open(path, "rb") as file:
        while end - cuts[-1] > chunk_bytes:
            cut = cuts[-1] + chunk_bytes
            file.seek(cut - 3)
            window = file.read(4)  # bytes cut-3 .. cut
            back = 0
            while back < 3 and (window[3 - back] & 0xC0) == 0x80:  # a continuation byte
                back += 1
            cuts.append(cut - back)
    return [*cuts, end]


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """One example per local text file: `path` (relative, UTF-8) and `content` (bytes).

    Build with `TextFiles(config=text_files_config(pattern), data_dir=...,
    file_format="array_record")`. Empty files are left out (counted in
    `info.metadata["empty_files"]`).
    """

    # Set here because TFDS 4.9.10 otherwise infers it with `importlib_resources`, a
    # package it imports but does not require (tensorflow/datasets#11212).
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {  # noqa: RUF012
        "1.0.0": "Raw bytes per file, train/validation split by path hash.",
        "1.1.0": "Files longer than chunk_bytes stored in parts; names keyed on the files.",
        "1.2.0": "A single file is split by bytes: its tail is held out.",
    }
    # No registered configs: every config names the files it was made from
    # (`text_files_config`), which are only known when it is made.

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files matched by a glob, one example per file.",
            features=tfds.features.FeaturesDict({
                "path": tfds.features.Text(),
                "content": tfds.features.Text(),
                "part": tfds.features.Scalar(dtype=np.int32),
                "parts": tfds.features.Scalar(dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # local files only
        config = self.builder_config
        splits = list_text_files(config.pattern, exclude=config.exclude,
                                 eval_fraction=config.eval_fraction)
        if files_fingerprint(splits) != config.fingerprint:
            raise ValueError(f"the files matching {config.pattern!r} changed between making "
                             "the builder and building it: make the builder again")
        self.info.metadata["pattern"] = config.pattern
        self.info.metadata["fingerprint"] = config.fingerprint
        self.info.metadata["chunk_bytes"] = config.chunk_bytes
        self.info.metadata["empty_files"] = {}
        self.info.metadata["multipart_documents"] = {}
        files = splits["train"] + splits["validation"]
        if len(files) == 1:
            return self._split_one_file(*files[0])
        # TFDS cannot write a split without examples, and empty files yield none: a
        # split whose files are all empty is left out (reading it then names it as
        # missing); without training text there is nothing to build.
        nonempty = {split: [f for f in files if os.path.getsize(f[1]) > 0]
                    for split, files in splits.items()}
        if not nonempty["train"]:
            raise ValueError(
                f"no training text in {config.pattern!r}: the {len(splits['train'])} "
                f"file(s) of the train split are empty ({len(splits['validation'])} held out "
                f"with eval_fraction={config.eval_fraction})")
        for split, files in splits.items():
            self.info.metadata["empty_files"][split] = len(files) - len(nonempty[split])
            self.info.metadata["multipart_documents"][split] = sum(
                os.path.getsize(path) > config.chunk_bytes for _, path in nonempty[split])
        return {split: self._generate_examples(files)
                for split, files in nonempty.items() if files}

    def _split_one_file(self, relative: str, path: str) -> dict:
        """The single file's head as `train`, its tail (`held_out_start`) as `validation`,
        each a document in parts of at most `chunk_bytes`."""
        config = self.builder_config
        size = os.path.getsize(path)
        cut = _held_out_cut(path, size, config.eval_fraction)
        if cut == 0:
            raise ValueError(f"no training text in {config.pattern!r}: the file is empty or "
                             f"wholly held out (eval_fraction={config.eval_fraction})")
        self.info.metadata["held_out_bytes"] = [cut, size]
        ranges = {"train": (0, cut), "validation": (cut, size)}
        self.info.metadata["empty_files"] = {split: int(start == end)
                                             for split, (start, end) in ranges.items()}
        self.info.metadata["multipart_documents"] = {
            split: int(end - start > config.chunk_bytes) for split, (start, end) in ranges.items()}
        return {split: self._generate_examples([(relative, path, start, end)], key_suffix=split)
                for split, (start, end) in ranges.items() if end > start}

    def _log_download_bytes(self) -> None:
        """TFDS would announce a download; local files are only read."""
        config = self.builder_config
        print(f"[kexue.data] building text_files from {config.pattern} "
              f"({config.eval_fraction:.0%} held out) into {self.data_dir}", flush=True)

    def _log_download_done(self) -> None:
        splits = {name: info.num_examples for name, info in self.info.splits.items()}
        held = self.info.metadata.get("held_out_bytes")
        detail = (f"one file of {held[1]:,} bytes, the last {held[1] - held[0]:,} held out"
                  if held
                  else ", ".join(f"{n} {name} file(s)" for name, n in sorted(splits.items())))
        print(f"[kexue.data] text_files built ({detail})", flush=True)

    def _generate_examples(self, files: list[tuple], key_suffix: str = ""
                           ) -> Iterator[tuple[str, dict]]:
        """Examples of `files`: `(relative, path)` for whole files, or `(relative, path,
        start, end)` for a byte range of one."""
        # Part 0's key is the relative path (the record order TFDS derives from the
        # keys does not change for files that fit in one part); later parts append
        # NUL and the part number, which no path contains.
        for relative, path, *span in files:
            start, end = span or (0, os.path.getsize(path))
            name = os.fsencode(relative)
            key = name.decode("utf-8", "backslashreplace")
            key = f"{key}:{key_suffix}" if key_suffix else key
            cuts = _cuts(path, start, end, self.builder_config.chunk_bytes)
            with open(path, "rb") as f:
                for part, (begin, stop) in enumerate(itertools.pairwise(cuts)):
                    f.seek(begin)
                    yield (key if part == 0 else f"{key}\0{part}"), {
                        "path": name, "content": f.read(stop - begin), "part": part,
                        "parts": len(cuts) - 1}
