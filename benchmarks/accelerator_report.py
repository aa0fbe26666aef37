"""The GPU sections of benchmarks/RESULTS.md and docs/results.md, from the campaign's JSON.

    python -m benchmarks.accelerator_report                  # print (results: DEFAULT_RESULTS)
    python -m benchmarks.accelerator_report --update         # rewrite the generated blocks
    python -m benchmarks.accelerator_report --results DIR    # another campaign's output

The campaign (`python -m benchmarks.accelerator --out DIR` on a GPU machine) writes
`<part>.json`; copy them into `benchmarks/accelerator_results/` and commit them with
the regenerated files, so every GPU figure in the documents comes from a committed
JSON file through this script (nothing is copied by hand).

Generated blocks, each between `<!-- NAME:begin -->` and `<!-- NAME:end -->`:

* ``accelerator-status`` in both files: for each part of `benchmarks.accelerator.PARTS`
  (the default run's and those run only when named, e.g. ``studies_ner``), whether GPU
  figures exist (device, date, status, sections done and skipped) or the part still
  waits for a GPU;
* ``accelerator-<part>`` in the part's `results_file` (the studies' in docs/results.md,
  the others in benchmarks/RESULTS.md): its tables, or the line saying it has no GPU
  figures yet.

Results count as figures only when their environment says an accelerator backend ran
them at full size; smoke or CPU results are refused unless `--allow-cpu` (tests).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from benchmarks.accelerator import PARTS, Part, read_part, render_part, render_table

DEFAULT_RESULTS = os.path.join("benchmarks", "accelerator_results")
FILES = ("benchmarks/RESULTS.md", "docs/results.md")
ACCELERATORS = ("gpu", "tpu")


def is_accelerator_figure(doc: dict[str, Any]) -> bool:
    env = doc.get("env") or {}
    return env.get("backend") in ACCELERATORS and not env.get("smoke", True)


def load_results(directory: str, *, allow_cpu: bool = False) -> dict[str, dict[str, Any]]:
    """The registered parts' documents found in `directory` (missing parts are absent).

    Raises:
      ValueError: a document holds smoke or CPU results and `allow_cpu` is False.
    """
    found = {}
    if not os.path.isdir(directory):
        return found
    for part in PARTS:
        doc = read_part(directory, part.name)
        if doc is None:
            continue
        if not allow_cpu and not is_accelerator_figure(doc):
            env = doc.get("env") or {}
            raise ValueError(
                f"{directory}/{part.name}.json: expected results of a full-size run on "
                f"{' or '.join(ACCELERATORS)}; got backend {env.get('backend')!r}, smoke "
                f"{env.get('smoke')!r} (pass --allow-cpu to render it anyway)")
        found[part.name] = doc
    return found


def status_block(docs: dict[str, dict[str, Any]]) -> str:
    """One row per registered part: whether it has figures, and from which run."""
    rows = []
    for part in PARTS:
        doc = docs.get(part.name)
        if doc is None:
            waits = "none yet: waits for a GPU" + (
                "" if part.in_default else f" (not in the default run: `--parts {part.name}`)")
            rows.append([part.name, part.title, waits, "—", "—", "—"])
            continue
        env = doc.get("env") or {}
        sections = doc.get("sections", [])
        done = sum(1 for s in sections if s.get("status") in ("ok", "failed"))
        skipped = sum(1 for s in sections if s.get("status") == "skipped")
        rows.append([part.name, part.title, f"{done} of {len(sections)} sections"
                     + (f" ({skipped} skipped)" if skipped else ""),
                     doc["status"], f"{env.get('device_kind', '?')} ({env.get('backend', '?')})",
                     str(env.get("date", "?"))[:10]])
    return render_table(["part", "what", "figures", "status", "device", "date"], rows)


def part_block(part: Part, doc: dict[str, Any] | None) -> str:
    if doc is None:
        return (f"No GPU figures yet: the `{part.name}` part of `python -m "
                "benchmarks.accelerator` waits for a GPU.\n")
    return render_part(doc, level=4)


def replace_block(text: str, name: str, content: str) -> str:
    """`text` with the lines between `<!-- name:begin -->` and `<!-- name:end -->` replaced.

    Raises:
      ValueError: the markers are missing or out of order.
    """
    begin, end = (re.escape(f"<!-- {name}:{edge} -->") for edge in ("begin", "end"))
    pattern = re.compile(rf"({begin}\n).*?({end})", re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"markers `<!-- {name}:begin -->` ... `<!-- {name}:end -->` not found")
    return pattern.sub(lambda m: m.group(1) + content.rstrip() + "\n" + m.group(2), text,
                       count=1)


def blocks_for(path: str, docs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The generated blocks (name → content) that belong in the document `path`."""
    blocks = {"accelerator-status": status_block(docs)}
    for part in PARTS:
        if part.results_file == path:
            blocks[f"accelerator-{part.name}"] = part_block(part, docs.get(part.name))
    return blocks


def update_file(path: str, docs: dict[str, dict[str, Any]], *, root: str = ".") -> bool:
    """Rewrites the generated blocks of `root/path`; True if the file changed."""
    full = os.path.join(root, path)
    with open(full, encoding="utf-8") as f:
        text = f.read()
    new = text
    for name, content in blocks_for(path, docs).items():
        new = replace_block(new, name, content)
    if new != text:
        with open(full, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=DEFAULT_RESULTS,
                        help="directory with the campaign's <part>.json files")
    parser.add_argument("--update", action="store_true",
                        help=f"rewrite the generated blocks of {' and '.join(FILES)}")
    parser.add_argument("--root", default=".", help="repository root (for --update)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="accept smoke or CPU results (tests; never for the documents)")
    args = parser.parse_args(argv)
    docs = load_results(args.results, allow_cpu=args.allow_cpu)
    if args.update:
        for path in FILES:
            changed = update_file(path, docs, root=args.root)
            print(f"{path}: {'updated' if changed else 'unchanged'}")
        return 0
    for path in FILES:
        for name, content in blocks_for(path, docs).items():
            print(f"<!-- {name} ({path}) -->\n{content}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
