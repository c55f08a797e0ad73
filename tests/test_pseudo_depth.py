"""``selfsup3d data pseudo-depth`` with a tiny randomly initialised depth model saved locally."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shards import render_scenes, write_colmap, write_singleview_shards

from selfsup3d.cli import main
from selfsup3d.datamodules import MultiViewShards, SingleViewShards
from selfsup3d.datamodules.format import Scene, ShardSink
from selfsup3d.datamodules.multiview import eval_view_order
from selfsup3d.datamodules.prepare.pseudo_depth import annotate_pseudo_depth, disparity_to_depth


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory) -> str:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
        backbone_out_indices=[0, 1, 2, 3],
    )
    model = DPTForDepthEstimation(config)
    with torch.no_grad():  # a head whose disparity varies over the image (transformers starts it at zero)
        model.head.head[-2].weight.normal_(std=1.0)
        model.head.head[-2].bias.fill_(1.0)
    path = tmp_path_factory.mktemp("tiny_dpt")
    model.save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(path)
    return str(path)


def _read(urls: str, with_depth: bool = True) -> dict:
    dm = SingleViewShards(
        train_urls=urls,
        val_urls=urls,
        batch_size=64,
        num_workers=0,
        image_size=32,
        with_depth=with_depth,
        pin_memory=False,
    )
    dm.setup("validate")
    return dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)


def test_disparity_to_depth_is_robust_and_ordered():
    disparity = torch.linspace(0, 1, 100).view(10, 10)
    disparity[0, 0] = 1e6  # an outlier does not move the others
    depth = disparity_to_depth(disparity, depth_range=10.0)
    assert depth.min() == pytest.approx(1.0) and depth.max() == pytest.approx(10.0)
    flat = depth.flatten()[1:]
    assert (flat[1:] <= flat[:-1] + 1e-6).all()  # larger disparity = nearer
    assert torch.isfinite(disparity_to_depth(torch.zeros(4, 4))).all()  # a constant map stays finite


def test_annotates_shards_keeping_labels_and_existing_depth(tmp_path, tiny_dpt):
    src = write_singleview_shards(tmp_path / "src", num_samples=6, size=32, num_shards=2, with_depth=False)
    out = tmp_path / "out"
    code = main(
        ["data", "pseudo-depth", src, "--out", str(out), "--model", tiny_dpt, "--batch-size", "4", "--no-progress"]
    )
    assert code == 0
    shards = sorted(out.glob("train-*.tar"))
    assert shards
    batch = _read(str(out / "train-*.tar"))
    original = _read(src, with_depth=False)
    assert batch["depth"].shape == (6, 1, 32, 32)
    valid = batch["depth"] > 0
    assert valid.float().mean() > 0.99
    assert batch["depth"][valid].min() >= 1.0 - 1e-2 and batch["depth"][valid].max() <= 10.0 + 1e-2
    assert (batch["depth"].flatten(1).std(dim=1) > 0.1).all()  # a depth map, not a constant
    assert torch.equal(batch["label"], original["label"])
    assert torch.equal(batch["image"], original["image"])  # images pass through unchanged

    # a sample with depth keeps it unless --replace
    metric = write_singleview_shards(tmp_path / "metric", num_samples=4, size=32, num_shards=1, with_depth=True)
    kept = tmp_path / "kept"
    assert main(["data", "pseudo-depth", metric, "--out", str(kept), "--model", tiny_dpt, "--no-progress"]) == 0
    assert torch.allclose(_read(str(kept / "train-*.tar"))["depth"], _read(metric)["depth"], atol=1e-3)


def test_annotates_an_image_folder_with_classes(tmp_path, tiny_dpt, capsys):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            arr = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "images" / cls / f"img.{i}.png")
    out = tmp_path / "out"
    args = ["data", "pseudo-depth", str(tmp_path / "images"), "--out", str(out), "--model", tiny_dpt, "--split", "val"]
    assert main([*args, "--no-progress"]) == 0
    assert "6 samples written" in capsys.readouterr().out
    batch = _read(str(out / "val-*.tar"))
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert (batch["depth"] > 0).all()
    # refuses to mix with existing shards unless --overwrite
    assert main([*args, "--no-progress"]) == 2
    assert main([*args, "--no-progress", "--overwrite"]) == 0


def test_errors_are_reported_not_raised(tmp_path, tiny_dpt, capsys):
    assert main(["data", "pseudo-depth", str(tmp_path / "nothing"), "--out", str(tmp_path), "--model", tiny_dpt]) == 2
    assert "neither shards nor a folder" in capsys.readouterr().err


@pytest.mark.parametrize("network", ["offline mode", "no network"])
def test_hub_model_unavailable_says_what_to_do(tmp_path, capsys, monkeypatch, request, network):
    from huggingface_hub import constants

    if network == "no network":
        tried = request.getfixturevalue("no_network")
    else:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    src = write_singleview_shards(tmp_path / "src", num_samples=2, size=32, num_shards=1, with_depth=False)
    model = "depth-anything/Depth-Anything-V2-Small-hf"
    code = main(["data", "pseudo-depth", src, "--out", str(tmp_path / "out"), "--model", model, "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert model in err and "--model" in err and "--local-dir" in err  # how to run it offline
    if network == "no network":
        assert len(tried) == 1  # one short probe, not minutes of retries


# ---------------------------------------------------------------------------- multi-view scenes
def _scene_metas(folder) -> dict[str, dict]:
    import json
    import tarfile

    metas = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas.update({m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")})
    return metas


def test_colmap_capture_gets_depth_scaled_to_its_sparse_points_and_trains_consensus(tmp_path, tiny_dpt, capsys):
    """A converted COLMAP capture with pseudo depth trains configs/demo/consensus.yaml from the CLI."""
    (scene,) = render_scenes(num_scenes=1, num_views=6, size=64, start=3)
    write_colmap(tmp_path / "capture", scene, points=60)
    converted, annotated = tmp_path / "converted", tmp_path / "annotated"
    assert main(["data", "convert", "colmap", str(tmp_path / "capture"), "--out", str(converted), "--workers", "1",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["data", "pseudo-depth", str(converted / "train-*.tar"), "--out", str(annotated), "--model", tiny_dpt,
                 "--no-progress"]) == 0  # fmt: skip
    assert "scenes' depth scaled to 1 sparse points" in capsys.readouterr().out
    metas = _scene_metas(annotated)
    (meta,) = [m for name, m in metas.items() if name.endswith("meta.json")]
    assert meta["depth_kind"] == "metric" and meta["pseudo_depth"]["aligned"] == "sparse points"
    url = str(annotated / "train-*.tar")
    dm = MultiViewShards(url, url, num_views=6, num_context_views=3, image_size=64, num_workers=0, batch_size=1)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert "depth" in batch and "c2w" in batch
    true = torch.from_numpy(np.stack(scene.depth)).float()[:, None]
    order = eval_view_order(6, 6, 3)
    fitted, truth = batch["depth"][0], true[order]
    both = (fitted > 0) & (truth > 0)
    # in the capture's units: the median depth within 25% of the true one (the tiny random model gives the shape)
    assert abs(float(fitted[both].median() / truth[both].median()) - 1) < 0.25

    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "consensus.yaml")
    main(["fit", "--config", config, "--data.init_args.train_urls", url, "--data.init_args.val_urls", url,
          "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2", "--trainer.max_steps", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    ckpt = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2


def test_unposed_scenes_get_depth_normalised_per_scene_and_marked_relative(tmp_path, tiny_dpt):
    scenes = render_scenes(num_scenes=2, num_views=3, size=32)
    with ShardSink(tmp_path / "src", "train") as sink:
        for s in scenes:  # unposed, as a converted video's clips
            sink.write(Scene(s.key, s.images, meta={"source": "video"}))
    out = tmp_path / "out"
    report = annotate_pseudo_depth(str(tmp_path / "src"), out, tiny_dpt, batch_size=2, progress=False)
    assert report.scenes == {"per scene": 2} and report.annotated == 2
    metas = _scene_metas(out)
    for s in scenes:
        meta = metas[f"{s.key}.meta.json"]
        assert meta["depth_kind"] == "relative" and meta["depth_scale"] > 0 and f"{s.key}.cameras.json" not in metas
    dm = MultiViewShards(str(out / "train-*.tar"), str(out / "train-*.tar"), num_views=3, image_size=32,
                         num_workers=0, batch_size=2)  # fmt: skip
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert dm.with_depth and "c2w" not in batch
    for depth in batch["depth"]:
        assert float(depth[depth > 0].median()) == pytest.approx(1.0, rel=0.05)  # one scale for the whole scene


def test_a_folder_of_16_bit_and_turned_photos_is_annotated_as_shown(tmp_path, tiny_dpt):
    """16-bit greyscale came out white (``convert("RGB")`` clips it); a photo whose EXIF orientation says it is turned
    is annotated and written upright, as the image converter writes it."""

    folder = tmp_path / "images"
    folder.mkdir()
    grey = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(grey).save(folder / "grey.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 24 wide and 16 high, shown 16 wide and 24 high
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(folder / "turned.jpg", exif=exif.tobytes())
    out = tmp_path / "out"
    assert main(["data", "pseudo-depth", str(folder), "--out", str(out), "--model", tiny_dpt, "--no-progress"]) == 0
    images = {}
    with tarfile.open(next(out.glob("train-*.tar"))) as tar:
        for member in tar.getmembers():
            key, _, field = member.name.partition(".")
            if field in ("png", "jpg", "depth.png"):
                images[(key, "depth" if field == "depth.png" else "image")] = Image.open(
                    io.BytesIO(tar.extractfile(member).read())
                )
    written = np.asarray(images["grey", "image"].convert("L")).astype(int)
    assert np.abs(written - np.round(grey / 257)).mean() < 2  # scaled (re-encoded as JPEG), not clipped to white
    turned = [image.size for (key, _), image in images.items() if key == "turned"]
    assert turned == [(16, 24), (16, 24)]  # the image and its depth, upright


def test_photos_of_mixed_aspect_ratio_are_annotated_at_the_default_batch_size(tmp_path, tiny_dpt):
    """Depth Anything's processor keeps the aspect ratio, so photos of other shapes become inputs of other sizes,
    which one batch cannot stack: images are batched by the size the processor gives them, each depth map at its
    image's size. A tiny random Depth Anything with that processor, saved here."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone, patch_size=8, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8,
    )  # fmt: skip
    model = tmp_path / "model"
    DepthAnythingForDepthEstimation(config).save_pretrained(model)
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=True, ensure_multiple_of=8)
    processor.save_pretrained(model)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(48, 32), (32, 64), (64, 32), (48, 32), (40, 40)]  # (width, height)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"photo{i}.png")
    out = tmp_path / "out"
    assert main(["data", "pseudo-depth", str(folder), "--out", str(out), "--model", str(model), "--no-progress"]) == 0

    with tarfile.open(next(out.glob("train-*.tar"))) as tar:
        depth_sizes = {
            member.name.split(".")[0]: Image.open(io.BytesIO(tar.extractfile(member).read())).size
            for member in tar.getmembers()
            if member.name.endswith(".depth.png")
        }
    assert depth_sizes == {f"photo{i}": size for i, size in enumerate(sizes)}
