"""Every image mode is converted faithfully or refused in words, by the converters and by the shard reader:
16-bit greyscale is scaled to 8 bits (Pillow's ``convert("RGB")`` clips it to white), 16-bit RGB PNGs are
re-encoded as the 8-bit images the shard spec says, images of a range that cannot be known are refused, and an
image's EXIF orientation is applied by the reader of single-view shards (written by other tools) as by the
converter, its depth and mask turned with it."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from shards import render_scenes

from selfsup3d.datamodules import MultiViewShards, SingleViewShards
from selfsup3d.datamodules.format import (
    EncodedImage,
    ImageSample,
    ShardSink,
    encode_image_sample,
    encode_scene,
)
from selfsup3d.datamodules.prepare.images import convert_images


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (greyscale ``[H, W]`` or RGB ``[H, W, 3]``) written byte by byte: Pillow cannot write 16-bit RGB."""
    h, w = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if values.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _ramp(h: int = 16, w: int = 16) -> np.ndarray:
    """16-bit values over the whole range, most of them above 255 (which Pillow's conversion turns white)."""
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def _exif_jpeg(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=100, exif=exif.tobytes())
    return buf.getvalue()


def _stored_images(out) -> dict[str, bytes]:
    """``{key: image bytes}`` of the single-view shards under ``out``."""
    found = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                if field in ("png", "jpg"):
                    found[key] = tar.extractfile(member).read()
    return found


def _val_batch(dm) -> dict:
    dm.setup("validate")
    (batch,) = [dm.prepare_batch(b, train=False) for b in dm.val_dataloader()]
    return batch


def test_image_folder_converts_16_bit_images_scaled_and_refuses_float_ones_in_words(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    grey = _ramp()
    rgb = np.stack([_ramp(), _ramp()[::-1], np.full((16, 16), 0x8000, np.uint16)], axis=-1)
    Image.fromarray(grey).save(src / "grey16.png")
    Image.fromarray(grey).save(src / "grey16.tif")
    (src / "rgb16.png").write_bytes(_png16(rgb))
    Image.fromarray(np.full((16, 16), 0.5, np.float32)).save(src / "float.tif")
    report = convert_images(src, tmp_path / "out", image_format="png", workers=1, progress=False)
    assert report.written == 3, report.summary()
    assert "32-bit floating-point image" in dict(report.skipped)["float.tif"]
    stored = _stored_images(tmp_path / "out")
    assert all(data[:4] == b"\x89PNG" and data[24] == 8 for data in stored.values())  # 8 bits (IHDR), not 16
    for key in ("grey16", "grey16_2"):
        image = np.asarray(Image.open(io.BytesIO(stored[key])).convert("RGB")).astype(int)
        assert np.abs(image - np.round(grey / 257)[..., None]).max() <= 1  # scaled, not clipped to white
    image = np.asarray(Image.open(io.BytesIO(stored["rgb16"]))).astype(int)
    assert np.abs(image - np.round(rgb / 257)).max() <= 1


def test_the_reader_scales_16_bit_greyscale_of_single_and_multi_view_shards(tmp_path):
    grey = _ramp()
    expected = torch.from_numpy(np.round(grey / 257) / 255).float()
    record = encode_image_sample(ImageSample("grey", np.zeros((16, 16, 3), np.uint8)), image_format="png")
    record["png"] = _png16(grey)  # as another tool writes it
    with ShardSink(tmp_path / "single", "val") as sink:
        sink.write(record)
    batch = _val_batch(SingleViewShards(sink.url, sink.url, batch_size=1, num_workers=0, image_size=16,
                                        with_depth=False))  # fmt: skip
    assert torch.allclose(batch["image"][0], expected.expand(3, -1, -1), atol=1.5 / 255)

    scene = encode_scene(render_scenes(num_scenes=1, num_views=2, size=16)[0])
    scene["001.png"] = _png16(grey)
    with ShardSink(tmp_path / "multi", "val") as sink:
        sink.write(scene)
    batch = _val_batch(MultiViewShards(sink.url, sink.url, num_views=2, batch_size=1, num_workers=0, image_size=16))
    # the 16-bit view, whichever place it is given
    assert any(torch.allclose(view, expected.expand(3, -1, -1), atol=1.5 / 255) for view in batch["images"][0])


def test_a_16_bit_png_passed_through_unchanged_is_refused_in_words():
    with pytest.raises(ValueError, match="a 16-bit PNG: images in shards are 8-bit"):
        encode_image_sample(ImageSample("grey", EncodedImage(_png16(_ramp()), "png")))


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_the_reader_turns_single_view_images_upright_with_their_depth_and_mask(tmp_path, orientation):
    """A JPEG whose EXIF orientation says it is turned (as phones store photos), in a shard written by another tool:
    read upright, as the image converter writes it, its depth and mask (stored as the pixels are) turned with it."""
    h, w = 16, 24  # stored landscape; orientations 6 and 8 show it as portrait
    upright = np.zeros((w, h, 3) if orientation in (6, 8) else (h, w, 3), np.uint8)
    upright[:4, :4] = 255  # a white top-left corner, as the photo is shown
    turn = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
    stored = np.asarray(Image.fromarray(upright).transpose(turn))  # what the camera wrote
    assert stored.shape[:2] == (h, w)
    depth = np.where(stored[..., 0] > 127, 2.0, 1.0).astype(np.float32)  # depth marks the same corner
    record = encode_image_sample(ImageSample("photo", stored, depth, mask=stored[..., 0] > 127), image_format="png")
    del record["png"]
    record["jpg"] = _exif_jpeg(stored, orientation)
    with ShardSink(tmp_path, "val") as sink:
        sink.write(record)
    out_hw = upright.shape[:2]
    batch = _val_batch(SingleViewShards(sink.url, sink.url, batch_size=1, num_workers=0, image_size=out_hw,
                                        with_masks=True))  # fmt: skip
    assert batch["image"].shape[-2:] == out_hw
    image = batch["image"][0, 0].numpy()
    assert image[:4, :4].min() > 0.9 and image[4:, 4:].max() < 0.1  # the corner is at the top left, as shown
    corner = np.zeros(out_hw, bool)
    corner[:4, :4] = True
    assert torch.equal(batch["mask"][0, 0].bool(), torch.from_numpy(corner))
    assert torch.allclose(batch["depth"][0, 0], torch.from_numpy(np.where(corner, 2.0, 1.0)).float(), atol=1e-3)
