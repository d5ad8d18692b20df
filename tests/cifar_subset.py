"""A few hundred real CIFAR-10 images from ../shared/data for optimizer tests (skipped when absent), loaded
through ``subgrad.data`` (its class order and normalisation, nothing repeated here)."""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np
import pytest
import torch

#: The team's archive beside the checkout; ``SUBGRAD_DATA`` points elsewhere (the GPU machine gets a copy).
ARCHIVE = pathlib.Path(
    os.environ.get("SUBGRAD_DATA")
    or pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
)


@functools.lru_cache(maxsize=None)
def _load(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    from subgrad.data import load_cifar10

    if not ARCHIVE.exists():
        pytest.skip(f"real CIFAR-10 not found at {ARCHIVE} (the team's ../shared/data); skipping real-data test")
    data = load_cifar10(ARCHIVE, download=False)  # decoded once, then from the cache
    images, labels = (
        (data.train_images, data.train_labels) if split == "train" else (data.test_images, data.test_labels)
    )
    picks = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(data.classes))])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in data.channel_stats())  # what training normalises by
    x = torch.from_numpy(images[picks]).permute(0, 3, 1, 2).float().div(255)
    return (x - mean) / std, torch.from_numpy(labels[picks])


def cifar_subset(split: str = "train", per_class: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images [N, 3, 32, 32], labels [N]) with the first ``per_class`` images of each class,
    classes and normalisation as ``subgrad.data`` gives them."""
    return _load(split, per_class)
