"""The benchmark scripts still run against the shipped configs (one short step each; figures are not checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
