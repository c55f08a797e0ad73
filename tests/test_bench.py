"""The benchmark scripts still run against the shipped configs (one short step each; figures are not checked), and
every one of them imports and keeps its work in ``main()``."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an imported module is (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bench_script_imports_and_runs_only_from_main(name, capsys):
    """``make bench`` runs them all: an import that broke (a renamed function) fails here, not in a benchmark
    run; and importing one does no work: beside imports, definitions and constants its only statement is
    ``if __name__ == "__main__": main()``."""
    tree = ast.parse((ROOT / "bench" / f"{name}.py").read_text())
    allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
    work = [
        node.lineno
        for node in tree.body
        if not isinstance(node, allowed)
        and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))  # a docstring
        and not (isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'")
    ]
    assert not work, f"bench/{name}.py does work at import (lines {work}): move it into main()"
    module = load_script(name)
    assert callable(getattr(module, "main", None))
    assert capsys.readouterr().out == ""


def test_loader_bench_times_the_pipeline_beside_the_plain_loop(capsys):
    bench = load_script("loader")
    bench.main(["--scenes", "8", "--scene-views", "4", "--render-size", "32", "--image-size", "32", "--batch-size", "4",
                "--batches", "2", "--repeats", "1", "--workers", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "plain loop" in out and "pipeline / plain loop, samples per CPU second" in out, out


def test_masked_view_bench_prints_throughput_memory_and_flops_for_the_demo_config(capsys):
    bench = load_script("masked_view")
    demo = ROOT / "configs" / "demo" / "masked_view.yaml"
    assert bench.main(["--configs", str(demo), "--device", "cpu", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "configs/demo/masked_view.yaml" in out
    for needle in ("samples/s", "peak memory", "GFLOP/step"):
        assert needle in out, out
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("Some Unknown Accelerator") is None


def test_multitask_bench_prints_the_ratio_to_the_objectives_alone(capsys):
    bench = load_script("multitask")
    assert bench.main(["--rounds", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for needle in ("multi-task", "masked_view alone", "triplane alone", "ratio multi-task / sum alone"):
        assert needle in out, out


def test_cameras_bench_prints_the_validation_curve_of_a_run(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    bench = load_script("cameras")
    writer = SummaryWriter(str(tmp_path / "lightning_logs" / "version_0"))
    for step, (psnr, auc) in enumerate([(20.0, 0.0), (23.5, 0.31)]):
        writer.add_scalar("val/psnr", psnr, 500 * (step + 1))
        writer.add_scalar("val/auc30", auc, 500 * (step + 1))
        writer.add_scalar("train/loss", 1.0, 500 * (step + 1))
    writer.close()
    assert bench.main(["--run", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "PSNR" in lines[1] and "AUC@30" in lines[1] and "loss" not in out
    assert lines[2].split() == ["500", "20.0", "0.000"] and lines[3].split() == ["1000", "23.5", "0.310"]
    command = bench.fit_command(4000, 250, tmp_path, "cpu", ["--x", "1"])
    assert command[command.index("--trainer.max_steps") + 1] == "4000" and command[-2:] == ["--x", "1"]
    assert command[command.index("--data.init_args.window_steps") + 1] == "3000"


def test_convert_bench_prints_frames_per_second_beside_the_plain_pyav_loop_and_scenes_per_second(capsys):
    pytest.importorskip("av")
    bench = load_script("convert")
    assert bench.main(["--videos", "1", "--seconds", "2", "--size", "64", "--repeats", "1", "--copies", "1"]) == 0
    out = capsys.readouterr().out
    assert "plain PyAV loop" in out and "frames/s" in out, out
    assert re.search(r"convert video / plain loop, frames per CPU second: \d+\.\d\d", out), out
    for name, scenes in (("re10k", 3), ("lvsm", 2), ("dl3dv", 2), ("co3d", 3)):  # one copy of each test's sources
        assert re.search(rf"convert {name} +{scenes} scenes \( *\d+ views\) .* \d+\.\d scenes/s", out), out
