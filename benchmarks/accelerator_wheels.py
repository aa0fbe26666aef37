"""The wheels the GPU machine lacks: plan the list, and check that it is complete.

    python -m benchmarks.accelerator_wheels check          # offline, against .whl/
    python -m benchmarks.accelerator_wheels plan           # online: what the image lacks

The GPU machine has no package index. Its image (`IMAGE_FILE`: every package it holds,
with the version where known) has jax, flax, optax, orbax, numpy, torch and more, but
not all that kexue needs; `WHEELS_FILE` pins what it lacks (one version each), and
`benchmarks/accelerator_wheels.sh` downloads those wheels (Python 3.12, manylinux
x86_64) into `.whl/`, building the ones published only as source archives.

`check` runs pip's resolver offline (`--no-index --only-binary=:all: --dry-run`, for
CPython 3.12 on manylinux x86_64) over kexue's requirements (`install_requires` and
the `peers` extra, read from setup.cfg) with `.whl/` and a stub wheel for every image
package as the only candidates. A stub has the image's name and version (with the
local label `+image`) and no requirements of its own: the image satisfies those. The
check fails when the resolution fails (a requirement nothing provides, or a version the
image or the wheels do not satisfy), when `.whl/` holds a package twice, a package the
image already has, a wheel the resolution does not use, or other versions than
`WHEELS_FILE` pins, or when the repository and the wheels together reach the 64 MiB
that may travel to the GPU machine.

A stub declares no extras, so pip resolves an extra requested of an image package
(tensorflow-datasets asks for `etils[epath, ...]`) to nothing but a warning: what such
extras pull in is not checked here. The campaign's correctness part checks the imports
on the GPU machine itself, first.

`plan` runs the same resolution against the package index (the stubs pinned by
constraints) and prints the packages it would install that the image does not have:
the content of `WHEELS_FILE`.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_FILE = os.path.join("benchmarks", "accelerator_image.txt")
WHEELS_FILE = os.path.join("benchmarks", "accelerator_wheels.txt")
WHEEL_DIR = ".whl"
PYTHON_VERSION = "3.12"
#: manylinux tags pip must be told one by one (it matches them exactly).
PLATFORMS = ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in range(5, 40)), "linux_x86_64")
TARGET_OPTIONS = ("--python-version", PYTHON_VERSION, "--implementation", "cp",
                  "--abi", "cp312", "--abi", "abi3", "--abi", "none",
                  *(option for platform in PLATFORMS for option in ("--platform", platform)))
LIMIT_BYTES = 64 * 2**20
STUB_LABEL = "image"


def normalize(name: str) -> str:
    """PEP 503 name: lowercase, runs of `-_.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, tuple[str, str]]:
    """`name==version  # comment` lines → {normalized name: (version, comment)}."""
    pins = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line, _, comment = raw.partition("#")
            line = line.strip()
            if not line:
                continue
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
            if match is None:
                raise ValueError(f"{path}:{number}: expected `name==version`; got {line!r}")
            name = normalize(match.group(1))
            if name in pins:
                raise ValueError(f"{path}:{number}: {name} is listed twice")
            pins[name] = (match.group(2), comment.strip())
    return pins


def kexue_requirements(root: str = ROOT) -> list[str]:
    """`install_requires` and the `peers` extra of setup.cfg."""
    config = configparser.ConfigParser()
    config.read(os.path.join(root, "setup.cfg"), encoding="utf-8")
    lines = config["options"]["install_requires"].splitlines()
    lines += config["options.extras_require"]["peers"].splitlines()
    return [line.strip() for line in lines if line.strip()]


# ----------------------------------------------------------------------------- stubs


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def write_stub_wheel(directory: str, name: str, version: str, *,
                     label: str | None = STUB_LABEL) -> str:
    """A wheel `name==version+label` (no label: `name==version`) with metadata only: no
    code, no requirements. Returns its path."""
    dist = re.sub(r"[-_.]+", "_", name)
    full_version = version if label is None else f"{version}+{label}"
    info = f"{dist}-{full_version}.dist-info"
    files = {
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {full_version}\n"
                             "Summary: stub of a package of the GPU image\n"),
        f"{info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: kexue-accelerator-stub\n"
                          "Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    record = "".join(f"{path},{_record_hash(text.encode())},{len(text.encode())}\n"
                     for path, text in files.items()) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record
    path = os.path.join(directory, f"{dist}-{full_version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def write_stubs(directory: str, image: dict[str, tuple[str, str]]) -> None:
    for name, (version, _) in image.items():
        write_stub_wheel(directory, name, version)


# ----------------------------------------------------------------------------- resolution


def pip_environment() -> dict[str, str]:
    """This process's environment without pip configuration (config files, `PIP_*`
    variables such as extra find-links or constraints of the machine), except the
    certificate bundle a network may need: the resolution sees only what it is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def resolve(requirements: list[str], find_links: list[str], *, index: bool,
            constraints: str | None = None) -> tuple[int, str, dict[str, Any] | None]:
    """pip's resolver in dry-run for CPython 3.12 / manylinux x86_64, wheels only.

    Returns `(exit status, pip's output, its installation report or None)`.
    """
    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, "report.json")
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                   "--quiet", "--only-binary=:all:", "--no-cache-dir", "--report", report,
                   "--disable-pip-version-check", *TARGET_OPTIONS]
        if not index:
            command.append("--no-index")
        for link in find_links:
            command += ["--find-links", link]
        if constraints is not None:
            command += ["--constraint", constraints]
        process = subprocess.run([*command, *requirements], capture_output=True, text=True,
                                 check=False, env=pip_environment())
        output = process.stdout + process.stderr
        doc = None
        if process.returncode == 0 and os.path.isfile(report):
            with open(report, encoding="utf-8") as f:
                doc = json.load(f)
        return process.returncode, output, doc


def installs(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """`(normalized name, version, url)` of each package the resolution installs."""
    return [(normalize(item["metadata"]["name"]), item["metadata"]["version"],
             item.get("download_info", {}).get("url", "")) for item in doc["install"]]


def wheel_names(directory: str) -> dict[str, list[tuple[str, str]]]:
    """{normalized name: [(version, file), ...]} of the wheels in `directory`."""
    found: dict[str, list[tuple[str, str]]] = {}
    for file in sorted(os.listdir(directory)):
        if not file.endswith(".whl"):
            continue
        dist, version = file.split("-")[:2]
        found.setdefault(normalize(dist), []).append((version, file))
    return found


def tracked_bytes(root: str) -> int | None:
    """Bytes of the files git tracks under `root` (None outside a git checkout)."""
    process = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True,
                             check=False)
    if process.returncode != 0:
        return None
    paths = [p for p in process.stdout.decode().split("\0") if p]
    return sum(os.path.getsize(os.path.join(root, p)) for p in paths
               if os.path.isfile(os.path.join(root, p)))


def check(root: str = ROOT, wheel_dir: str | None = None) -> list[str]:
    """Problems found (empty when the wheel set is complete); prints a summary."""
    wheel_dir = wheel_dir or os.path.join(root, WHEEL_DIR)
    if not os.path.isdir(wheel_dir):
        return [f"{wheel_dir} does not exist: run benchmarks/accelerator_wheels.sh first"]
    image = read_pins(os.path.join(root, IMAGE_FILE))
    pinned = read_pins(os.path.join(root, WHEELS_FILE))
    wheels = wheel_names(wheel_dir)
    problems = []
    for name, versions in wheels.items():
        if len(versions) > 1:
            problems.append(f".whl holds {name} {len(versions)} times: "
                            f"{[file for _, file in versions]} (one version each)")
        if name in image:
            problems.append(f".whl holds {name}, which the image has ({image[name][0]}); "
                            "the image's version must stay")
        if name not in pinned:
            problems.append(f".whl holds {name}, which {WHEELS_FILE} does not pin")
        elif versions[0][0] != pinned[name][0]:
            problems.append(f".whl holds {name} {versions[0][0]}; {WHEELS_FILE} pins "
                            f"{pinned[name][0]}")
    problems += [f"{WHEELS_FILE} pins {name}=={version}, which .whl lacks"
                 for name, (version, _) in pinned.items() if name not in wheels]
    overlap = sorted(set(pinned) & set(image))
    if overlap:
        problems.append(f"{WHEELS_FILE} pins packages the image has: {overlap}")
    requirements = kexue_requirements(root)
    with tempfile.TemporaryDirectory() as stubs:
        write_stubs(stubs, image)
        status, output, doc = resolve(requirements, [wheel_dir, stubs], index=False)
    if doc is None:
        problems.append(f"pip could not resolve kexue's requirements offline (exit {status}):\n"
                        + output.strip())
        return problems
    chosen = installs(doc)
    from_wheels = sorted(name for name, version, _ in chosen if not version.endswith(
        f"+{STUB_LABEL}"))
    from_image = sorted(name for name, version, _ in chosen if version.endswith(
        f"+{STUB_LABEL}"))
    unused = sorted(set(wheels) - set(from_wheels))
    if unused:
        problems.append(f".whl holds wheels the resolution does not use: {unused}")
    wheel_bytes = sum(os.path.getsize(os.path.join(wheel_dir, file))
                      for versions in wheels.values() for _, file in versions)
    repo_bytes = tracked_bytes(root)
    total = wheel_bytes + (repo_bytes or 0)
    if total >= LIMIT_BYTES:
        problems.append(f"repository ({repo_bytes} B) + wheels ({wheel_bytes} B) = {total} B "
                        f"reach the {LIMIT_BYTES} B that may travel to the GPU machine")
    print(f"requirements: {', '.join(requirements)}")
    print(f"resolved offline for CPython {PYTHON_VERSION}, manylinux x86_64: "
          f"{len(from_wheels)} packages from .whl, {len(from_image)} from the image")
    print("from .whl: " + ", ".join(f"{n}=={v}" for n, v, _ in chosen if n in from_wheels))
    print("from the image: " + ", ".join(from_image))
    print(f"sizes: wheels {wheel_bytes / 2**20:.1f} MiB, tracked repository files "
          f"{(repo_bytes or 0) / 2**20:.1f} MiB, together {total / 2**20:.1f} MiB "
          f"(limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    return problems


def plan(root: str = ROOT, extra_links: list[str] | None = None) -> int:
    """Prints `name==version` of what kexue needs beyond the image (package index)."""
    image = read_pins(os.path.join(root, IMAGE_FILE))
    with tempfile.TemporaryDirectory() as stubs:
        write_stubs(stubs, image)
        constraints = os.path.join(stubs, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as f:
            f.writelines(f"{name}=={version}+{STUB_LABEL}\n"
                         for name, (version, _) in image.items())
        status, output, doc = resolve(kexue_requirements(root), [stubs, *(extra_links or [])],
                                      index=True, constraints=constraints)
    if doc is None:
        print(output, file=sys.stderr)
        return status or 1
    for name, version, _ in sorted(installs(doc)):
        if not version.endswith(f"+{STUB_LABEL}"):
            print(f"{name}=={version}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("check", "plan"))
    parser.add_argument("--root", default=ROOT, help="repository root")
    parser.add_argument("--find-links", action="append", default=[],
                        help="plan: more wheel directories (e.g. .whl with built wheels)")
    args = parser.parse_args(argv)
    if args.command == "plan":
        return plan(args.root, args.find_links)
    problems = check(args.root)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print("wheel set complete" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
