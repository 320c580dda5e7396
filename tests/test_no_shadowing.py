"""No module of ours may shadow an installed distribution's top-level name.

A folder on ``sys.path`` (the repository root for ``python -m benchmarks.X``, ``tests/`` under pytest, a
script's own folder when run as ``python folder/script.py``) makes every module in it importable by its bare
name; an installed package that some dependency imports by that name then loads ours instead (transformers
5.25 imports ``kernels``, which ``benchmarks/kernels.py`` once shadowed).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"sparseforge_compile"}


def _exposed_names() -> dict[str, Path]:
    """Every bare module name a folder of ours can put on sys.path."""
    names: dict[str, Path] = {}
    for entry in ROOT.iterdir():  # the repository root
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir() or entry.suffix == ".py":
            names[entry.stem] = entry
    for folder in ("benchmarks", "tests", "passes"):  # folders whose scripts/modules may be run directly
        for f in (ROOT / folder).glob("*.py"):
            if not f.stem.startswith("_"):
                names[f.stem] = f
    return names


def clashes(exposed: dict[str, Path], installed: dict[str, list[str]]) -> dict[str, tuple]:
    return {name: (path.relative_to(ROOT), installed[name]) for name, path in exposed.items()
            if name in installed and name not in OURS}


def test_no_module_shadows_an_installed_distribution():
    found = clashes(_exposed_names(), importlib.metadata.packages_distributions())
    assert not found, f"rename these (they shadow installed packages): {found}"


def test_the_guard_sees_a_clash():
    """A script named like an installed package is caught; our own package is not a clash."""
    exposed = {**_exposed_names(), "kernels": ROOT / "benchmarks" / "kernels.py"}
    installed = {"kernels": ["kernels"], "sparseforge_compile": ["sparseforge-compile"], "torch": ["torch"]}
    assert set(clashes(exposed, installed)) == {"kernels"}
    assert {"benchmarks", "accuracy", "conftest"} <= set(_exposed_names())


def test_an_uninstalled_checkout_says_to_install_it(tmp_path):
    """Without `pip install -e .` the package has no `passes` subpackage: the import says what to run
    instead of failing deep inside the first module that needs it (-S: no site, so no editable finder)."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "sparseforge_compile", tmp_path / "sparseforge_compile",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-S", "-c", "import sparseforge_compile"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "is not installed: run `pip install -e .`" in out.stderr.strip().splitlines()[-1]
