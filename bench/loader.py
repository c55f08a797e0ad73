"""Loader throughput: MultiViewShards' WebDataset pipeline against the same decoding in a plain loop.

Prints multi-view samples per second and images per second for one worker and for all cores, for

* ``plain``: a plain loop (``tarfile``, group members by key, the same :class:`MultiViewDecoder` and
  collate), no WebDataset, no DataLoader, in one forked process (as a DataLoader worker is); "all cores"
  runs one such loop per core on its share of the shards;
* ``pipeline``: ``MultiViewShards.train_dataloader()`` (resampled shards, shuffle buffer, random views and
  crops, batching in the workers, DataLoader transport to the main process) with 1 and with N workers;

and the pipeline's per-core rate as a fraction of the plain loop's (the target is at least 80 %), measured
as samples per CPU second of all processes involved (the main process and the DataLoader workers), which
stays meaningful on a busy machine where wall-clock rates swing with other load.

Without ``--shards`` it first renders a data set with the embedded renderer into a temporary folder::

    .venv/bin/python bench/loader.py                       # 256 scenes x 8 views, 64x64, 4 views per sample
    .venv/bin/python bench/loader.py --shards 'data/train-{000000..000003}.tar' --image-size 128
"""

from __future__ import annotations

import argparse
import gc
import itertools
import multiprocessing as mp
import os
import random
import tarfile
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from selfsup3d.datamodules import MultiViewShards
from selfsup3d.datamodules.base import Collate
from selfsup3d.datamodules.multiview import BATCH_FIELDS, MultiViewDecoder
from selfsup3d.datamodules.pipeline import expand_urls
from selfsup3d.datamodules.prepare.render import RenderSettings, render_dataset


def plain_samples(paths: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples of the tar files, grouped by key, without WebDataset."""
    for path in paths:
        with tarfile.open(path) as tar:
            current: dict[str, Any] | None = None
            for member in tar:
                if not member.isfile():
                    continue
                key, field = member.name.split(".", 1)
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": path}
                current[field] = data
            if current is not None:
                yield current


def plain_loop(paths: list[str], args: argparse.Namespace, batches: int, seed: int = 0) -> tuple[int, float, float]:
    """Decode and collate ``batches`` batches in a plain loop; returns (samples, wall s, CPU s)."""
    decoder = MultiViewDecoder(args.views, args.views // 2, (args.image_size, args.image_size), args.with_depth, False)
    collate = Collate(BATCH_FIELDS, {"num_context": args.views // 2})  # as MultiViewShards collates
    rng = random.Random(seed)
    source = itertools.chain.from_iterable(plain_samples(paths) for _ in itertools.count())
    buffer: list[dict[str, Any]] = []
    done = 0
    start, cpu = time.perf_counter(), time.process_time()
    for raw in source:
        buffer.extend(decoder(raw, rng))
        if len(buffer) == args.batch_size:
            collate(buffer)
            buffer = []
            done += 1
            if done == batches:
                break
    return done * args.batch_size, time.perf_counter() - start, time.process_time() - cpu


def _plain_worker(job: tuple[list[str], argparse.Namespace, int, int]) -> tuple[int, float, float]:
    paths, args, batches, seed = job
    import torch

    torch.set_num_threads(1)
    return plain_loop(paths, args, batches, seed)


def plain_parallel(paths: list[str], args: argparse.Namespace, workers: int) -> tuple[int, float, float]:
    """One plain loop per process, each on its share of the shards (all shards when there are fewer)."""
    shares = [paths[i::workers] or paths for i in range(workers)]
    jobs = [(share, args, args.batches, i) for i, share in enumerate(shares)]
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        start = time.perf_counter()
        results = pool.map(_plain_worker, jobs)
        seconds = time.perf_counter() - start
    return sum(r[0] for r in results), seconds, sum(r[2] for r in results)


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from ``/proc``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pipeline(urls: list[str], args: argparse.Namespace, workers: int) -> tuple[int, float, float]:
    """Batches from MultiViewShards' training loader: (samples, wall s, CPU s of the main process and the
    workers), both over the timed batches only: the first ones (worker start-up, shuffle buffer) are not
    counted."""
    warmup = max(2, 2 * workers)
    total = warmup + args.batches * max(1, workers)
    dm = MultiViewShards(
        urls, None, batch_size=args.batch_size, num_workers=workers, image_size=args.image_size,
        num_views=args.views, with_depth=args.with_depth, shuffle_buffer=args.shuffle_buffer,
        batches_per_epoch=total, seed=0, pin_memory=False,
    )  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = iter(loader)
    for _ in range(warmup):
        next(batches)
    dataloader = loader.loader  # the DataLoader inside the resumable stream (persistent workers)
    pids = [w.pid for w in dataloader._iterator._workers] if workers else []

    def cpu() -> float:
        return time.process_time() + sum(_process_cpu(pid) for pid in pids)

    start, cpu_start = time.perf_counter(), cpu()
    n = 0
    for _ in range(total - warmup):
        next(batches)
        n += 1
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
    del batches, loader, dataloader
    gc.collect()
    return n * args.batch_size, seconds, cpu_seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default=None, help="multi-view shard URLs (default: render a data set)")
    parser.add_argument("--scenes", type=int, default=256, help="scenes to render without --shards")
    parser.add_argument("--scene-views", type=int, default=8, help="views per rendered scene")
    parser.add_argument("--render-size", type=int, default=64, help="rendered image size")
    parser.add_argument("--views", type=int, default=4, help="views per multi-view sample")
    parser.add_argument("--image-size", type=int, default=64, help="delivered image size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=120, help="timed batches per worker")
    parser.add_argument("--shuffle-buffer", type=int, default=64)
    parser.add_argument("--with-depth", action="store_true", help="decode depth too")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the best is shown")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="'all cores' count")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.shards is None:
            settings = RenderSettings(num_views=args.scene_views, size=args.render_size, seed=0)
            info = render_dataset(tmp, args.scenes, 0, settings, scenes_per_shard=32, progress=False)
            args.shards = info["splits"]["train"]["url"]
            print(f"rendered {args.scenes} scenes x {args.scene_views} views at {args.render_size}px "
                  f"({info['scenes_per_second']} scenes/s)")  # fmt: skip
        urls = expand_urls(args.shards, "--shards")
        print(f"{len(urls)} shards; samples of {args.views} views at {args.image_size}px, batch {args.batch_size}, "
              f"depth {'on' if args.with_depth else 'off'}; {args.workers} cores")  # fmt: skip
        rows = []
        for name, run, workers in (
            # one forked process like a DataLoader worker: forked children run ~10% slower than the parent here
            ("plain loop", lambda: plain_parallel(urls, args, 1), 1),
            ("pipeline", lambda: pipeline(urls, args, 1), 1),
            ("plain loop", lambda: plain_parallel(urls, args, args.workers), args.workers),
            ("pipeline", lambda: pipeline(urls, args, args.workers), args.workers),
        ):
            # best of --repeats runs: the machine may be shared, and contention only ever slows a run down
            results = [run() for _ in range(args.repeats)]
            rate = max(samples / seconds for samples, seconds, _ in results)
            per_cpu = max(samples / cpu for samples, _, cpu in results)
            rows.append((name, workers, rate, per_cpu))
        print(f"{'':12} {'workers':>7} {'samples/s':>10} {'images/s':>10} {'per core':>10} {'per CPU-s':>10}")
        for name, workers, rate, per_cpu in rows:
            print(f"{name:12} {workers:>7} {rate:>10.1f} {rate * args.views:>10.1f} {rate / workers:>10.1f} "
                  f"{per_cpu:>10.1f}")  # fmt: skip
        print("(samples/s: wall clock; per core: samples/s / workers; per CPU-s: samples per CPU second of all the "
              "processes involved, which contention on a shared machine does not distort)")  # fmt: skip
        one, many = rows[1][3] / rows[0][3], rows[3][3] / rows[2][3]
        verdict = "OK" if min(one, many) >= 0.8 else "BELOW the 80% target"
        print(f"pipeline / plain loop, samples per CPU second: {one:.0%} with 1 worker, {many:.0%} with "
              f"{args.workers}: {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
