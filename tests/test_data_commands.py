"""``selfsup3d data``: sub-commands, help, and the lazily imported ``pseudo-depth`` slot."""

from __future__ import annotations

import argparse
import sys
import types

import pytest

from selfsup3d.cli import data as commands
from selfsup3d.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["render", "--help"], ["convert", "--help"],
                                  ["convert", "blender", "--help"], ["convert", "colmap", "--help"],
                                  ["convert", "images", "--help"]])  # fmt: skip
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(["data", *argv])
    assert err.value.code == 0
    assert "usage: selfsup3d data" in capsys.readouterr().out


def test_unknown_and_missing_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as err:
        main(["data", "convert", "nerfstudio", "x", "--out", "y"])
    assert err.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["data", "render"])
    assert err.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["data", "convert", "images", "x", "--out", "y", "--background", "pink"])
    assert err.value.code == 2 and "R,G,B" in capsys.readouterr().err


def test_pseudo_depth_is_dispatched_to_its_module(monkeypatch):
    seen = {}
    fake = types.ModuleType("selfsup3d.datamodules.prepare.pseudo_depth")
    fake.__doc__ = "Fake pseudo depth."

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("src")
        parser.add_argument("--out")

    def run(args: argparse.Namespace) -> int:
        seen.update(vars(args))
        return 3

    fake.add_arguments, fake.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "selfsup3d.datamodules.prepare.pseudo_depth", fake)
    assert main(["data", "pseudo-depth", "shards.tar", "--out", "o"]) == 3
    assert seen == {"src": "shards.tar", "out": "o"}


def test_pseudo_depth_missing_module_fails_clearly(monkeypatch, capsys):
    real = commands.importlib.import_module

    def import_module(name: str, *args, **kwargs):
        if name == "selfsup3d.datamodules.prepare.pseudo_depth":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(commands.importlib, "import_module", import_module)
    assert main(["data", "pseudo-depth", "x"]) == 2
    assert "pseudo-depth: not available" in capsys.readouterr().err
