"""``selfsup3d data``: sub-commands, help, usage errors, and the pseudo-depth arguments."""

from __future__ import annotations

import pytest

from selfsup3d.cli import main
from selfsup3d.datamodules.prepare import pseudo_depth


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


def test_pseudo_depth_arguments_reach_the_library_function(monkeypatch, capsys):
    seen = {}

    def annotate(src, out, model, **kwargs):
        seen.update(src=src, out=out, model=model, **kwargs)
        return pseudo_depth.PseudoDepthReport(3, 2, "disparity", {"train": (3, 1, "o/train-000000.tar")})

    monkeypatch.setattr(pseudo_depth, "annotate_pseudo_depth", annotate)
    argv = ["data", "pseudo-depth", "shards.tar", "--out", "o", "--model", "m", "--batch-size", "2", "--replace"]
    assert main(argv) == 0
    assert seen["src"] == "shards.tar" and seen["out"] == "o" and seen["model"] == "m"
    assert seen["batch_size"] == 2 and seen["replace"] is True and seen["progress"] is True
    out = capsys.readouterr().out
    assert "3 samples written (2 annotated with m, kind disparity) to o" in out and "train: 3 samples" in out


def test_pseudo_depth_usage_errors(capsys):
    with pytest.raises(SystemExit) as err:
        main(["data", "pseudo-depth", "--help"])
    assert err.value.code == 0 and "usage: selfsup3d data pseudo-depth" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["data", "pseudo-depth", "x"])
    assert err.value.code == 2 and "--out" in capsys.readouterr().err
    assert main(["data", "pseudo-depth", "x", "--out", "o", "--model", "m", "--batch-size", "0"]) == 2
    assert "--batch-size and --shard-size must be >= 1" in capsys.readouterr().err
