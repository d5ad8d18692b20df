"""CIFAR-10 from any common layout, decoded once and cached, and a device-resident batch loader.

Accepted ``path`` layouts (checked in this order):

* a ``.tar.gz`` / ``.tgz`` of an ImageFolder tree (``[top/]train/<class>/*``, ``[top/]test/<class>/*``),
  read without extracting (for example ``../shared/data/cifar10-jpeg.tar.gz``);
* a torchvision release folder (``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch``),
  either the folder itself or its parent;
* an ImageFolder tree (``train/<class>/*``, ``test/<class>/*``), possibly one level down;
* a missing path: ``torchvision.datasets.CIFAR10(path, download=True)`` fetches the release there
  (when the network allows).

The decoded uint8 arrays are cached as ``.npz`` in ``$SUBGRAD_CACHE`` (default
``~/.cache/subgrad``), keyed by the source's absolute path, size and modification time, so later runs
skip decoding (60,000 JPEGs take ~10 s to decode on 2 cores, the cache ~0.2 s to load).

:class:`DeviceLoader` keeps the whole uint8 set on the training device; shuffling, random crop
(reflect-pad 4) and horizontal flips happen there per batch.  The order depends only on
``(order_seed, epoch)`` and the augmentation only on ``(augment_seed, epoch, batch)``, so a run resumed
at any step sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pickle
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .kernels import next_step_seed_, philox_bits, step_seed
from .run_folder import atomic_write

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
LAYOUTS = (
    "a .tar.gz of train/<class>/ and test/<class>/ image folders, an extracted torchvision "
    "cifar-10-batches-py folder, or an ImageFolder tree with train/<class>/ and test/<class>/"
)


class DataError(ValueError):
    """The data is missing or not in an accepted layout (the message says what was expected)."""


@dataclass
class Dataset:
    """uint8 images [N, 32, 32, 3] (NHWC, RGB) and int64 labels for both splits."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in [0, 1] (the normalisation constants)."""
        x = torch.from_numpy(self.train_images).float().div_(255).reshape(-1, 3)
        return x.mean(0).tolist(), x.std(0).tolist()


# -- decoding ---------------------------------------------------------------------------------------
def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"unreadable image {name}: {exc}") from None
    if array.shape != (32, 32, 3):
        raise DataError(f"image {name} is {array.shape[1]}x{array.shape[0]}, expected 32x32 CIFAR-10 images")
    return array


def _assemble(files: dict[str, dict[str, list[tuple[str, bytes]]]], where: str) -> dict:
    """files[split][class] = [(name, bytes)] -> arrays; checks both splits have the same classes."""
    for split in ("train", "test"):
        if not files.get(split):
            raise DataError(f"{where} has no {split}/<class>/ image folders; expected {LAYOUTS}")
    train_classes, test_classes = set(files["train"]), set(files["test"])
    if train_classes != test_classes:
        missing = [f"test/{c}" for c in sorted(train_classes - test_classes)]
        missing += [f"train/{c}" for c in sorted(test_classes - train_classes)]
        raise DataError(
            f"{where}: class folder {', '.join(missing)} missing (train and test must have the same classes)"
        )
    classes = tuple(sorted(train_classes))
    out = {}
    for split in ("train", "test"):
        images, labels = [], []
        for label, cls in enumerate(classes):
            for name, data in sorted(files[split][cls]):
                images.append(_decode(data, name))
                labels.append(label)
        out[split] = (np.stack(images), np.asarray(labels, dtype=np.int64))
    return dict(train=out["train"], test=out["test"], classes=classes)


def _from_tar(path: pathlib.Path) -> dict:
    files: dict = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = pathlib.PurePosixPath(member.name).parts
                if not member.isfile() or len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
                    continue
                split, cls = parts[-3], parts[-2]
                if split in ("train", "test"):
                    files.setdefault(split, {}).setdefault(cls, []).append(
                        (f"{path.name}:{member.name}", tar.extractfile(member).read())
                    )
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot read archive {path}: {exc}") from None
    return _assemble(files, f"archive {path}")


def _image_folder_root(path: pathlib.Path) -> pathlib.Path | None:
    for root in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    return None


def _from_image_folder(root: pathlib.Path) -> dict:
    files: dict = {}
    for split in ("train", "test"):
        for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            entries = [
                (str(f), f.read_bytes()) for f in sorted(cls_dir.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES
            ]
            files.setdefault(split, {})[cls_dir.name] = entries
    return _assemble(files, f"folder {root}")


def _torchvision_root(path: pathlib.Path) -> pathlib.Path | None:
    for root in (path, path / "cifar-10-batches-py"):
        if (root / "data_batch_1").is_file() and (root / "test_batch").is_file():
            return root
    return None


def _from_torchvision(root: pathlib.Path) -> dict:
    def read(name):
        try:
            with open(root / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            return batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(batch["labels"], np.int64)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise DataError(f"corrupt torchvision CIFAR-10 file {root / name}: {exc}") from None

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    test = read("test_batch")
    train = (np.ascontiguousarray(np.concatenate([p[0] for p in parts])), np.concatenate([p[1] for p in parts]))
    return dict(train=train, test=(np.ascontiguousarray(test[0]), test[1]), classes=CIFAR10_CLASSES)


def _download(path: pathlib.Path) -> dict:
    try:
        import torchvision

        torchvision.datasets.CIFAR10(str(path), train=True, download=True)
    except Exception as exc:  # urllib/socket errors vary by platform; all mean "could not fetch"
        raise DataError(
            f"{path} does not exist and downloading CIFAR-10 there failed ({type(exc).__name__}: {exc}); "
            f"without network, point --data at {LAYOUTS}"
        ) from None
    return _from_torchvision(path / "cifar-10-batches-py")


# -- cache + entry point ----------------------------------------------------------------------------
def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SUBGRAD_CACHE") or pathlib.Path.home() / ".cache" / "subgrad")


def _cache_file(path: pathlib.Path) -> pathlib.Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v1".encode()).hexdigest()[:16]
    return cache_dir() / f"cifar-{key}.npz"


def load_cifar10(path: str | os.PathLike, download: bool = True, use_cache: bool = True) -> Dataset:
    """Load CIFAR-10 from ``path`` in any accepted layout (module docstring); raises :class:`DataError`."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        if not download:
            raise DataError(f"data path {path} does not exist; expected {LAYOUTS}")
        arrays = _download(path)
    else:
        cached = _cache_file(path) if use_cache else None
        if cached is not None and cached.is_file():
            try:
                with np.load(cached, allow_pickle=False) as z:
                    return Dataset(
                        z["train_images"],
                        z["train_labels"],
                        z["test_images"],
                        z["test_labels"],
                        tuple(str(c) for c in z["classes"]),
                        str(path),
                    )
            except (OSError, ValueError, KeyError):
                pass  # a broken cache is rebuilt below
        if path.is_file():
            if not tarfile.is_tarfile(path):
                raise DataError(f"{path} is a file but not a tar archive; expected {LAYOUTS}")
            arrays = _from_tar(path)
        elif (root := _torchvision_root(path)) is not None:
            arrays = _from_torchvision(root)
        elif (root := _image_folder_root(path)) is not None:
            arrays = _from_image_folder(root)
        else:
            raise DataError(f"{path} is not in a known layout; expected {LAYOUTS}")
        if cached is not None:
            atomic_write(
                cached,
                lambda tmp: np.savez(
                    tmp,
                    train_images=arrays["train"][0],
                    train_labels=arrays["train"][1],
                    test_images=arrays["test"][0],
                    test_labels=arrays["test"][1],
                    classes=np.asarray(arrays["classes"]),
                ),
            )
    return Dataset(
        arrays["train"][0],
        arrays["train"][1],
        arrays["test"][0],
        arrays["test"][1],
        tuple(arrays["classes"]),
        str(path),
    )


# -- device loader ----------------------------------------------------------------------------------
def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (for per-epoch / per-batch generators)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DeviceLoader:
    """Batches of normalised float images from a uint8 set that lives on ``device``.

    Args:
        images: uint8 [N, 32, 32, 3]; labels: int64 [N].
        mean, std: per-channel normalisation constants (from :meth:`Dataset.channel_stats`).
        batch_size: images per batch; ``drop_last`` drops a final short batch (training).
        augment: random crop with 4-pixel reflect padding and horizontal flips (training).
        shuffle: new order each epoch from ``order_seed``; augmentation from ``augment_seed``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean,
        std,
        batch_size: int,
        device,
        augment: bool = False,
        shuffle: bool = False,
        drop_last: bool = False,
        order_seed: int = 0,
        augment_seed: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)  # NCHW view
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.batch_size, self.augment, self.shuffle, self.drop_last = batch_size, augment, shuffle, drop_last
        self.order_seed, self.augment_seed = order_seed, augment_seed
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its order): drawn once per epoch
        self._positions = torch.arange(batch_size, device=self.device)  # a batch's positions in the order
        self._crop_offsets = torch.arange(32, device=self.device)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def order(self, epoch: int) -> torch.Tensor:
        """The image order of ``epoch``, on the device.  Drawn on the host from ``(order_seed, epoch)`` so
        it is the same on every device and rank, once per epoch (the last one is kept)."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(_mix(self.order_seed, epoch))
                order = torch.randperm(self.num_images, generator=gen).to(self.device)
            else:
                order = torch.arange(self.num_images, device=self.device)
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of ``epoch``: the same images as :meth:`gather` at step ``epoch * len(self) + index``."""
        idx = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        seed = step_seed(self.augment_seed, epoch * len(self) + index) if self.augment else None
        return self._prepare(idx, seed)

    def gather(self, order: torch.Tensor, step: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of step ``step`` (an int64 ``[1]`` on the device, advanced by one) of the epoch whose image
        order is ``order`` (:meth:`order`, on the device).  Every value is computed on the device (``seed``,
        an int64 ``[1]``, receives the step's augmentation seed), so a CUDA graph can capture it."""
        positions = torch.remainder(step, len(self)) * self.batch_size + self._positions
        idx = order[positions]
        if self.augment:
            next_step_seed_(step, seed, self.augment_seed)  # seed = step_seed(augment_seed, step); step += 1
        else:
            step.add_(1)
        return self._prepare(idx, seed if self.augment else None)

    def epoch(self, epoch: int, start: int = 0):
        """Iterate over the batches of ``epoch`` from batch ``start`` (for resuming mid-epoch)."""
        for index in range(start, len(self)):
            yield self.batch(epoch, index)

    def _prepare(self, idx: torch.Tensor, seed) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx].float()
        if seed is not None:
            x = self._augment(x, seed)
        return (x - self.mean) / self.std, self.labels[idx]

    def _augment(self, x: torch.Tensor, seed) -> torch.Tensor:
        """Random 32x32 crops of the 4-pixel reflect-padded images and horizontal flips, drawn from the
        Philox words of ``seed`` (an int, or an int64 device tensor): per image, words 0 and 1 give the
        row and column shift (mod 9), bit 0 of word 2 the flip."""
        n = x.shape[0]
        words = philox_bits(seed, n, device=self.device)
        shifts = ((words[:, :2] & 0x7FFFFFFF) % 9).T.long()
        flips = (words[:, 2] & 1) == 1
        padded = F.pad(x, (4, 4, 4, 4), mode="reflect")  # [n, 3, 40, 40]
        ar = self._crop_offsets
        rows = (shifts[0][:, None] + ar)[:, None, :, None].expand(n, 3, 32, 40)
        x = padded.gather(2, rows)
        cols = (shifts[1][:, None] + ar)[:, None, None, :].expand(n, 3, 32, 32)
        x = x.gather(3, cols)
        return torch.where(flips[:, None, None, None], x.flip(3), x)
