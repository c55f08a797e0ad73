"""The installed layout: datamodules/ and callbacks/ only as selfsup3d.*, every package listed."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRS = {
    "selfsup3d": ROOT / "selfsup3d",
    "selfsup3d.datamodules": ROOT / "datamodules",
    "selfsup3d.callbacks": ROOT / "callbacks",
}


def _packages_on_disk() -> set[str]:
    found = set()
    for name, path in DIRS.items():
        found.add(name)
        for init in path.rglob("__init__.py"):
            rel = init.parent.relative_to(path)
            if rel.parts:
                found.add(".".join([name, *rel.parts]))
    return found


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert _packages_on_disk() <= listed


def test_every_module_imports():
    for name in DIRS:
        pkg = importlib.import_module(name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}."):
            importlib.import_module(info.name)


def test_no_top_level_datamodules_or_callbacks(tmp_path):
    code = (
        "import importlib.util, selfsup3d.datamodules, selfsup3d.callbacks\n"
        "assert importlib.util.find_spec('datamodules') is None\n"
        "assert importlib.util.find_spec('callbacks') is None\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_repository_folders_refuse_a_top_level_import():
    res = subprocess.run([sys.executable, "-c", "import callbacks"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "import selfsup3d.callbacks" in res.stderr
