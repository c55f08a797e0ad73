"""Loader throughput: MultiViewShards' WebDataset pipeline against the same decoding in a plain loop.

Prints multi-view samples per second and images per second for one worker and for all cores, for

* ``plain``: a plain loop (``tarfile``, group members by key, the same :class:`MultiViewDecoder` and
  collate), no WebDataset, no DataLoader; "all cores" runs one such loop per core on its share of shards;
* ``pipeline``: ``MultiViewShards.train_dataloader()`` (resampled shards, shuffle buffer, random views and
  crops, batching in the workers, DataLoader transport to the main process) with 1 and with N workers;

and the pipeline's per-core rate as a fraction of the plain loop's (the target is at least 80 %).

Without ``--shards`` it first renders a data set with the embedded renderer into a temporary folder::

    .venv/bin/python bench/loader.py                       # 256 scenes x 8 views, 64x64, 4 views per sample
    .venv/bin/python bench/loader.py --shards 'data/train-{000000..000003}.tar' --image-size 128
"""

from __future__ import annotations

import argparse
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
from selfsup3d.datamodules.multiview import MultiViewDecoder, _CollateMultiView
from selfsup3d.datamodules.pipeline import expand_urls
from selfsup3d.datamodules.render import RenderSettings, render_dataset


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


def plain_loop(paths: list[str], args: argparse.Namespace, batches: int, seed: int = 0) -> tuple[int, float]:
    """Decode and collate ``batches`` batches in a plain loop; returns (samples, seconds)."""
    decoder = MultiViewDecoder(args.views, args.views // 2, (args.image_size, args.image_size), args.with_depth, False)
    collate = _CollateMultiView(args.views // 2)
    rng = random.Random(seed)
    source = itertools.chain.from_iterable(plain_samples(paths) for _ in itertools.count())
    buffer: list[dict[str, Any]] = []
    done = 0
    start = time.perf_counter()
    for raw in source:
        buffer.extend(decoder(raw, rng))
        if len(buffer) == args.batch_size:
            collate(buffer)
            buffer = []
            done += 1
            if done == batches:
                break
    return done * args.batch_size, time.perf_counter() - start


def _plain_worker(job: tuple[list[str], argparse.Namespace, int, int]) -> tuple[int, float]:
    paths, args, batches, seed = job
    import torch

    torch.set_num_threads(1)
    return plain_loop(paths, args, batches, seed)


def plain_parallel(paths: list[str], args: argparse.Namespace, workers: int) -> tuple[int, float]:
    """One plain loop per process, each on its share of the shards (all shards when there are fewer)."""
    shares = [paths[i::workers] or paths for i in range(workers)]
    jobs = [(share, args, args.batches, i) for i, share in enumerate(shares)]
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        start = time.perf_counter()
        results = pool.map(_plain_worker, jobs)
        seconds = time.perf_counter() - start
    return sum(n for n, _ in results), seconds


def pipeline(urls: list[str], args: argparse.Namespace, workers: int) -> tuple[int, float]:
    """Batches from MultiViewShards' training loader; the first ``warmup`` batches are not timed."""
    warmup = max(2, 2 * workers)
    dm = MultiViewShards(
        urls, None, batch_size=args.batch_size, num_workers=workers, image_size=args.image_size,
        num_views=args.views, with_depth=args.with_depth, shuffle_buffer=args.shuffle_buffer,
        batches_per_epoch=warmup + args.batches * max(1, workers), seed=0, pin_memory=False,
    )  # fmt: skip
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    n = sum(1 for _ in loader)
    return n * args.batch_size, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default=None, help="multi-view shard URLs (default: render a data set)")
    parser.add_argument("--scenes", type=int, default=256, help="scenes to render without --shards")
    parser.add_argument("--scene-views", type=int, default=8, help="views per rendered scene")
    parser.add_argument("--render-size", type=int, default=64, help="rendered image size")
    parser.add_argument("--views", type=int, default=4, help="views per multi-view sample")
    parser.add_argument("--image-size", type=int, default=64, help="delivered image size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per worker")
    parser.add_argument("--shuffle-buffer", type=int, default=64)
    parser.add_argument("--with-depth", action="store_true", help="decode depth too")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the best is shown")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="'all cores' count")
    args = parser.parse_args()

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
            ("plain loop", lambda: plain_loop(urls, args, args.batches), 1),
            ("pipeline", lambda: pipeline(urls, args, 1), 1),
            ("plain loop", lambda: plain_parallel(urls, args, args.workers), args.workers),
            ("pipeline", lambda: pipeline(urls, args, args.workers), args.workers),
        ):
            # best of --repeats runs: the machine may be shared, and contention only ever slows a run down
            rate = max(samples / seconds for samples, seconds in (run() for _ in range(args.repeats)))
            rows.append((name, workers, rate))
        print(f"{'':12} {'workers':>7} {'samples/s':>10} {'images/s':>10} {'per core':>10}")
        for name, workers, rate in rows:
            print(f"{name:12} {workers:>7} {rate:>10.1f} {rate * args.views:>10.1f} {rate / workers:>10.1f}")
        one = rows[1][2] / rows[0][2]
        many = rows[3][2] / rows[2][2]
        verdict = "OK" if min(one, many) >= 0.8 else "BELOW the 80% target"
        print(f"pipeline / plain loop per core: {one:.0%} with 1 worker, {many:.0%} with {args.workers}: {verdict}")


if __name__ == "__main__":
    main()
