"""A few hundred real CIFAR-10 images from ../shared/data for optimizer tests (skipped when absent)."""
from __future__ import annotations

import functools
import io
import os
import pathlib
import tarfile

import numpy as np
import pytest
import torch

#: The team's archive beside the checkout; ``SUBGRAD_DATA`` points elsewhere (the GPU machine gets a copy).
ARCHIVE = pathlib.Path(os.environ.get("SUBGRAD_DATA") or
                       pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


@functools.lru_cache(maxsize=None)
def _load(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    if not ARCHIVE.exists():
        pytest.skip(f"real CIFAR-10 not found at {ARCHIVE} (the team's ../shared/data); skipping real-data test")
    images, labels, counts = [], [], dict.fromkeys(CLASSES, 0)
    with tarfile.open(ARCHIVE, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[1] != split or counts.get(parts[2], per_class) >= per_class:
                continue
            counts[parts[2]] += 1
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            labels.append(CLASSES.index(parts[2]))
            if all(c >= per_class for c in counts.values()):
                break
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)
    return (x - MEAN) / STD, torch.tensor(labels)


def cifar_subset(split: str = "train", per_class: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images [N, 3, 32, 32], labels [N]) with ``per_class`` images of each class."""
    return _load(split, per_class)
