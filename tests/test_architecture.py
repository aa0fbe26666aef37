"""Dependencies between the repository's top-level folders point one way.

    kexue        imports none of configs/, experiments/, benchmarks/, tests/
    configs      import kexue and configs/common.py only
    experiments  import kexue, configs and experiments (never benchmarks)
    benchmarks   import kexue, configs and benchmarks (never experiments)

Every `import` statement of every Python file is read with `ast` (module level and
inside functions alike), so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kexue", "configs", "experiments", "benchmarks", "tests")
#: folder -> repository folders it may import.
ALLOWED = {
    "kexue": {"kexue"},
    "configs": {"kexue", "configs"},
    "experiments": {"kexue", "configs", "experiments"},
    "benchmarks": {"kexue", "configs", "benchmarks"},
}


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """`(line, dotted module)` of every import in the file (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def arrows(folder: str) -> list[tuple[str, int, str]]:
    """`(file, line, target folder)` for every import of a repository folder."""
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in FOLDERS:
                out.append((str(path.relative_to(ROOT)), line, module))
    return out


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_point_one_way(folder):
    wrong = [f"{file}:{line} imports {module}" for file, line, module in arrows(folder)
             if module.split(".")[0] not in ALLOWED[folder]]
    assert not wrong, "\n".join(wrong)


def test_configs_import_only_common_among_configs():
    wrong = [f"{file}:{line} imports {module}" for file, line, module in arrows("configs")
             if module.startswith("configs") and module != "configs.common"]
    assert not wrong, "\n".join(wrong)


def test_the_reader_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "kexue" / "sub"
    package.mkdir(parents=True)
    source = "import os\ndef f():\n    from experiments import run\nfrom . import sibling\n"
    (package / "mod.py").write_text(source)
    modules = [module for _, module in imported_modules(package / "mod.py", tmp_path)]
    assert sorted(modules) == ["experiments", "kexue.sub", "os"]
