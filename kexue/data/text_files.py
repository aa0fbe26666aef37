"""A TFDS builder over any glob of local text files (default: the Python standard library).

Each file becomes one example `{"path": relative path, "content": raw bytes}`. Files
are split into `train` and `validation` by a hash of their path relative to the
glob's root, so the held-out files are the same on every machine that has them and
do not move when other files are added. A glob that matches a single file holds out
the file's tail instead: its last `eval_fraction` of bytes, from the start of the
line holding that point (`held_out_start`), is the `validation` example and the rest
the `train` one. The builder config's name is derived from the glob, the exclusions
and the eval fraction, so different corpora never share a cache directory.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob as globlib
import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

__all__ = [
    "DEFAULT_EXCLUDE",
    "TextFiles",
    "TextFilesConfig",
    "default_text_glob",
    "held_out_start",
    "list_text_files",
    "text_files_config",
]

DEFAULT_EXCLUDE: tuple[str, ...] = ("site-packages", "dist-packages")


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


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """Which files: `pattern` (glob), `exclude` (fnmatch on path parts), `eval_fraction`."""

    pattern: str = ""
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    eval_fraction: float = 0.05


def text_files_config(
    pattern: str | None = None,
    *,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    eval_fraction: float = 0.05,
) -> TextFilesConfig:
    """A `TextFilesConfig` named after a hash of its fields (`pattern` None: stdlib)."""
    pattern = os.path.abspath(os.path.expanduser(pattern or default_text_glob()))
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"`eval_fraction` must be in [0, 1), got {eval_fraction}")
    key = json.dumps([pattern, list(exclude), float(eval_fraction)])
    name = "files_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return TextFilesConfig(
        name=name, pattern=pattern, exclude=tuple(exclude), eval_fraction=float(eval_fraction),
        description=f"{pattern} (excluding {list(exclude)}), {eval_fraction:.0%} held out",
    )


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """One example per local text file: `path` (relative, UTF-8) and `content` (bytes).

    Build with `TextFiles(config=text_files_config(pattern), data_dir=...,
    file_format="array_record")`. Empty files are left out (counted in
    `info.metadata["empty_files"]`).
    """

    # Set here because TFDS 4.9.10 otherwise infers it with `importlib_resources`, a
    # package it imports but does not require (tensorflow/datasets#11212).
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {  # noqa: RUF012
        "1.0.0": "Raw bytes per file, train/validation split by path hash.",
        "1.1.0": "A single file is split by bytes: its tail is held out.",
    }
    # The default: the standard library of the interpreter that imported this module.
    BUILDER_CONFIGS = [text_files_config()]  # noqa: RUF012 (TFDS reads this class attribute)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files matched by a glob, one example per file.",
            features=tfds.features.FeaturesDict({
                "path": tfds.features.Text(),
                "content": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # local files only
        config = self.builder_config
        splits = list_text_files(config.pattern, exclude=config.exclude,
                                 eval_fraction=config.eval_fraction)
        self.info.metadata["pattern"] = config.pattern
        self.info.metadata["empty_files"] = {}
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
        return {split: self._generate_examples(files)
                for split, files in nonempty.items() if files}

    def _split_one_file(self, relative: str, path: str) -> dict:
        """The single file's head as `train`, its tail (`held_out_start`) as `validation`."""
        with open(path, "rb") as f:
            content = f.read()
        cut = held_out_start(content, self.builder_config.eval_fraction)
        if cut == 0:
            raise ValueError(f"no training text in {self.builder_config.pattern!r}: the file "
                             f"is empty or wholly held out (eval_fraction="
                             f"{self.builder_config.eval_fraction})")
        self.info.metadata["held_out_bytes"] = [cut, len(content)]
        parts = {"train": content[:cut], "validation": content[cut:]}
        self.info.metadata["empty_files"] = {split: int(not part)
                                             for split, part in parts.items()}
        name = os.fsencode(relative)
        return {split: iter([(f"{name.decode('utf-8', 'backslashreplace')}:{split}",
                              {"path": name, "content": part})])
                for split, part in parts.items() if part}

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

    def _generate_examples(self, files: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
        for relative, path in files:
            with open(path, "rb") as f:
                content = f.read()
            name = os.fsencode(relative)
            yield name.decode("utf-8", "backslashreplace"), {"path": name, "content": content}
