"""Training throughput, peak memory and model FLOP utilisation of masked-view prediction (RayZer).

For each config (default: the CPU demo and the two GPU configs, latent and explicit renderer), the model is
built exactly as ``selfsup3d fit --config CFG`` builds it (the CLI parses the file; overrides below), then full
training steps (forward, backward, AdamW step; under the config's precision) run on random multi-view batches of
the config's shape. Printed per config:

* training samples (scenes) per second and images per second;
* peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's peak resident set
  (``ru_maxrss``, which includes Python, torch and the model: a ceiling, not the step's own use);
* model FLOPs per training step, counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward and
  backward (matrix multiplications and attention; element-wise work is not counted), and the achieved FLOP/s;
* on a GPU, the model FLOP utilisation (MFU): achieved FLOP/s over the GPU's dense bf16 peak (a table of
  common GPUs, or ``--peak-tflops``).

A GPU config is too large for a CPU at its own batch: on the CPU it runs with ``--gpu-batch`` scenes
(default 1) and ``--gpu-views``/``--gpu-context`` views (default 3 = 2 context + 1 target), and says so.

    .venv/bin/python bench/masked_view.py                    # all three configs, CUDA when available
    .venv/bin/python bench/masked_view.py --configs configs/demo/masked_view.yaml --steps 20
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfsup3d.cli import SelfSup3DCLI

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "masked_view.yaml"
GPU = ROOT / "configs" / "masked_view.yaml"
GPU_GAUSSIANS = ROOT / "configs" / "masked_view_gaussians.yaml"

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 (V100 has no bf16)
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by (a part of) its name, longest match first; ``None`` if unknown."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def build(config: Path, device: str, overrides: list[str]) -> tuple[Any, Any, str]:
    """Model, datamodule and precision of ``config`` as the CLI builds them (no training run)."""
    args = ["--config", str(config), "--trainer.logger", "false",
            "--trainer.callbacks", "[]", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.accelerator", "gpu" if device == "cuda" else "cpu", *overrides]  # fmt: skip
    cli = SelfSup3DCLI(args=args, run=False)
    return cli.model, cli.datamodule, str(cli.trainer.precision)


def random_batch(batch: int, views: int, context: int, hw: tuple[int, int], device: str) -> dict[str, Any]:
    return {"images": torch.rand(batch, views, 3, *hw, device=device), "num_context": context}


def bench_config(config: Path, device: str, args: argparse.Namespace) -> dict[str, Any]:
    overrides: list[str] = []
    gpu_config = config.resolve().parent.name != "demo"  # the paper-size configs: random weights, CPU-sized batch
    note = ""
    if gpu_config:
        overrides += ["--model.init_args.encoder.init_args.pretrained", "false"]  # speed does not need weights
        if device != "cuda":
            overrides += [
                "--data.init_args.batch_size", str(args.gpu_batch),
                "--data.init_args.num_views", str(args.gpu_views),
                "--data.init_args.num_context_views", str(args.gpu_context),
            ]  # fmt: skip
            note = (
                f"GPU config measured on the CPU at batch {args.gpu_batch} with {args.gpu_views} views "
                f"({args.gpu_context} context), not its own batch and views"
            )
    model, dm, precision = build(config, device, overrides)
    model = model.to(device).train()
    model.configure_model()
    hw, views, context, batch_size = dm.image_hw, dm.num_views, dm.num_context_views, dm.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bf16 = "bf16" in precision
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext()
    batch = random_batch(batch_size, views, context, hw, device)

    def train_step() -> None:
        with autocast:
            loss = model.step(batch, "train", model.encoder)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        train_step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    sync()
    step_s = (time.perf_counter() - start) / args.steps

    with FlopCounterMode(display=False) as counter, autocast:
        model.step(batch, "train", model.encoder)["loss"].backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    if device == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
        mem_text = f"{peak_mem:.2f} GiB (CUDA max allocated)"
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        mem_text = f"{peak_mem:.2f} GiB (process peak RSS so far)"
    result = {
        "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        "precision": precision,
        "batch": f"{batch_size} scenes x {views} views ({context} context) at {hw[0]}x{hw[1]}",
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": step_s,
        "samples_per_s": batch_size / step_s,
        "images_per_s": batch_size * views / step_s,
        "peak_memory": mem_text,
        "flops_per_step": flops,
        "achieved_tflops": flops / step_s / 1e12,
        "note": note,
    }
    if device == "cuda":
        peak = args.peak_tflops or peak_tflops(torch.cuda.get_device_name())
        result["mfu"] = result["achieved_tflops"] / peak if peak else None
        result["peak_bf16_tflops"] = peak
    return result


def report(r: dict[str, Any]) -> str:
    lines = [
        f"== {r['config']}  [{r['device']}, {r['precision']}]",
        f"   batch: {r['batch']}; {r['params_M']:.1f} M parameters",
        f"   training: {r['samples_per_s']:.2f} samples/s ({r['images_per_s']:.1f} images/s), "
        f"{1000 * r['step_s']:.0f} ms/step",
        f"   peak memory: {r['peak_memory']}",
        f"   model FLOPs: {r['flops_per_step'] / 1e9:.1f} GFLOP/step (FlopCounterMode), "
        f"achieved {r['achieved_tflops'] * 1000:.1f} GFLOP/s",
    ]
    if "mfu" in r:
        if r["mfu"] is None:
            lines.append("   MFU: unknown GPU peak; pass --peak-tflops")
        else:
            lines.append(f"   MFU: {100 * r['mfu']:.1f}% of {r['peak_bf16_tflops']:.0f} TFLOP/s dense bf16")
    if r["note"]:
        lines.append(f"   note: {r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs", nargs="+", type=Path, default=[DEMO, GPU, GPU_GAUSSIANS], help="configs to measure"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default %(default)s)")
    parser.add_argument("--gpu-batch", type=int, default=1, help="GPU config on the CPU: scenes per batch")
    parser.add_argument("--gpu-views", type=int, default=3, help="GPU config on the CPU: views per scene")
    parser.add_argument("--gpu-context", type=int, default=2, help="GPU config on the CPU: context views")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (TFLOP/s)")
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    if device == "cpu":
        print("no GPU found (torch.cuda.is_available() is False): measuring on the CPU; no MFU", flush=True)
    for config in args.configs:
        steps, warmup = args.steps, args.warmup
        if device == "cpu" and config.resolve() == GPU.resolve():
            args.steps, args.warmup = min(steps, 1), min(warmup, 1)  # minutes a step on a CPU
        print(report(bench_config(config, device, args)), flush=True)
        args.steps, args.warmup = steps, warmup
        gc.collect()  # the previous config's model is garbage now
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
