"""Synthetic single-view batches with exact depth and class labels, following the SingleViewShards
contract (``image`` [B,3,H,W] in [0,1], ``depth`` [B,1,H,W] with 0 = unknown, ``label`` [B], ``key``)."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

CLASS_COLOURS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.3, 0.9], [0.2, 0.8, 0.3]])


def sphere_scene(size: int, label: int, generator: torch.Generator, fov_deg: float = 40.0) -> dict:
    """A sphere of the class's colour in front of a grey wall, seen by a pinhole camera; z-depth of both
    (wall pixels on the right half have unknown depth, 0)."""
    f = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    v, u = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    d = torch.stack([(u - size / 2) / f, (v - size / 2) / f, torch.ones_like(u)], dim=-1)  # z = 1 rays
    centre = torch.tensor(
        [
            (torch.rand(1, generator=generator).item() - 0.5) * 0.6,
            (torch.rand(1, generator=generator).item() - 0.5) * 0.6,
            2.0 + torch.rand(1, generator=generator).item(),
        ]
    )
    radius = 0.5 + 0.3 * torch.rand(1, generator=generator).item()
    wall = 4.0
    # ray-sphere intersection with t = z-depth: |t d - c|^2 = r^2
    a = (d * d).sum(-1)
    b = -2 * (d * centre).sum(-1)
    c = (centre * centre).sum() - radius**2
    disc = b * b - 4 * a * c
    hit = disc > 0
    t = (-b - disc.clamp(min=0).sqrt()) / (2 * a)
    depth = torch.where(hit, t, torch.full_like(t, wall))
    shade = torch.where(
        hit[..., None],
        0.6 + 0.4 * (-(t[..., None] * d - centre)[..., 2:3] / radius).clamp(0, 1),
        torch.ones_like(t)[..., None],
    )
    colour = torch.where(hit[..., None], CLASS_COLOURS[label] * shade, torch.full((size, size, 3), 0.5))
    depth = depth.clone()
    depth[:, size - size // 8 :] = torch.where(hit[:, size - size // 8 :], depth[:, size - size // 8 :], 0.0)
    return {"image": colour.permute(2, 0, 1).clamp(0, 1), "depth": depth[None], "label": torch.tensor(label)}


class SphereScenes(Dataset):
    def __init__(self, n: int, size: int, seed: int, num_classes: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            item = sphere_scene(size, i % num_classes, g)
            item["key"] = f"sphere_{seed}_{i}"
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class SphereDataModule(LightningDataModule):
    """Spheres with depth and labels (3 classes), train and validation from different seeds."""

    num_classes = 3

    def __init__(self, num_train: int = 12, num_val: int = 6, image_size: int = 32, batch_size: int = 6) -> None:
        super().__init__()
        self.num_train, self.num_val, self.image_size, self.batch_size = num_train, num_val, image_size, batch_size

    def train_dataloader(self) -> DataLoader:
        ds = SphereScenes(self.num_train, self.image_size, 0)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(SphereScenes(self.num_val, self.image_size, 1), batch_size=self.batch_size)


def sphere_batch(n: int = 4, size: int = 32, seed: int = 0) -> dict:
    ds = SphereScenes(n, size, seed)
    batch = {k: torch.stack([ds[i][k] for i in range(n)]) for k in ("image", "depth", "label")}
    batch["key"] = [ds[i]["key"] for i in range(n)]
    return batch
