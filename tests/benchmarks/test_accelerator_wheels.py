"""`benchmarks.accelerator_wheels`: pins, stub wheels, the offline resolver check."""

from __future__ import annotations

import os
import textwrap

import pytest

from benchmarks import accelerator_wheels as wheels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_committed_pin_files_parse_and_do_not_overlap():
    image = wheels.read_pins(os.path.join(ROOT, wheels.IMAGE_FILE))
    pinned = wheels.read_pins(os.path.join(ROOT, wheels.WHEELS_FILE))
    assert {"jax", "flax", "optax", "orbax-checkpoint", "numpy", "protobuf", "pyarrow",
            "torch", "transformers"} <= set(image)
    assert image["jax"][0] == "0.11.2" and image["numpy"][0] == "2.5.2"
    assert {"ml-collections", "grain", "array-record", "tensorflow-datasets", "tensorboardx",
            "promise"} <= set(pinned)
    assert not set(image) & set(pinned)
    assert all(comment for _, comment in image.values())  # every version says where from


def test_read_pins_rejects_malformed_and_repeated_lines(tmp_path):
    path = tmp_path / "pins.txt"
    path.write_text("# comment\nFoo_Bar==1.0  # why\n\n")
    assert wheels.read_pins(str(path)) == {"foo-bar": ("1.0", "why")}
    path.write_text("foo>=1.0\n")
    with pytest.raises(ValueError, match=r"pins.txt:1: expected `name==version`"):
        wheels.read_pins(str(path))
    path.write_text("foo==1\nFOO==2\n")
    with pytest.raises(ValueError, match=r"pins.txt:2: foo is listed twice"):
        wheels.read_pins(str(path))


def test_stub_wheels_satisfy_requirements_offline(tmp_path):
    wheels.write_stub_wheel(str(tmp_path), "alpha-pkg", "1.2")
    status, output, doc = wheels.resolve(["alpha_pkg>=1"], [str(tmp_path)], index=False)
    assert status == 0, output
    assert [(name, version) for name, version, _ in wheels.installs(doc)] == [
        ("alpha-pkg", "1.2+image")]
    status, output, doc = wheels.resolve(["alpha-pkg>=2"], [str(tmp_path)], index=False)
    assert status != 0 and doc is None
    assert "alpha-pkg" in output.lower()


def fake_repository(root, *, image: str, pins: str, requires: str, peers: str) -> str:
    (root / "benchmarks").mkdir(parents=True)
    (root / wheels.IMAGE_FILE).write_text(image)
    (root / wheels.WHEELS_FILE).write_text(pins)
    (root / "setup.cfg").write_text(
        "[options]\ninstall_requires =\n" + textwrap.indent(requires, "    ")
        + "\n[options.extras_require]\npeers =\n" + textwrap.indent(peers, "    ") + "\n")
    (root / wheels.WHEEL_DIR).mkdir()
    return str(root / wheels.WHEEL_DIR)


def plain_wheel(directory: str, name: str, version: str) -> None:
    """A wheel of `name==version` (a stub without its local label: for the check only the
    name and version matter)."""
    wheels.write_stub_wheel(directory, name, version, label=None)


def test_check_finds_missing_duplicate_overlapping_and_unused_wheels(tmp_path, capsys):
    wheel_dir = fake_repository(tmp_path, image="alpha==1.0  # seen\ngamma==2.0  # seen\n",
                                pins="beta==0.5\n", requires="alpha>=1\nbeta", peers="gamma")
    problems = "\n".join(wheels.check(str(tmp_path)))
    assert "pins beta==0.5, which .whl lacks" in problems
    assert "could not resolve kexue's requirements offline" in problems and "beta" in problems
    plain_wheel(wheel_dir, "beta", "0.5")
    assert wheels.check(str(tmp_path)) == []
    out = capsys.readouterr().out
    assert "1 packages from .whl, 2 from the image" in out
    plain_wheel(wheel_dir, "beta", "0.6")  # a second version
    plain_wheel(wheel_dir, "alpha", "1.1")  # a package the image has
    plain_wheel(wheel_dir, "delta", "3.0")  # needed by nothing
    problems = "\n".join(wheels.check(str(tmp_path)))
    assert ".whl holds beta 2 times" in problems
    assert ".whl holds alpha, which the image has (1.0)" in problems
    assert ".whl holds delta, which benchmarks/accelerator_wheels.txt does not pin" in problems
    assert "the resolution does not use: ['delta']" in problems


def test_check_without_wheels_says_how_to_get_them(tmp_path):
    fake_repository(tmp_path, image="", pins="", requires="", peers="")
    os.rmdir(tmp_path / wheels.WHEEL_DIR)
    (problem,) = wheels.check(str(tmp_path))
    assert "run benchmarks/accelerator_wheels.sh first" in problem


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, wheels.WHEEL_DIR)),
                    reason=".whl/ is absent: `bash benchmarks/accelerator_wheels.sh` fetches "
                           "the wheels (it needs the package index)")
def test_the_downloaded_wheels_complete_the_gpu_image():
    assert wheels.check(ROOT) == []
