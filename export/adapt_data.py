"""Images for ``subgrad adapt``, read without torch: a folder or a .tar/.tar.gz archive of images.

Accepted layouts (``--data DIR|ARCHIVE``):

* ``adapt/`` and ``eval/`` sub-trees (what ``subgrad corrupt`` writes): the first adapts, the second is
  the held-out part measured before and after;
* otherwise every image found; ``eval_fraction`` of them (a seeded choice) are held out.

Below either, ``<class>/<image>`` gives labels: the folder name must be one of the model's class names.
Images straight in the folder (or folders that are not class names, with ``labelled=False``) are
unlabelled.  Every image must have the model's size: adaptation is measured on what the model is fed.
"""

from __future__ import annotations

import hashlib
import io
import pathlib
import tarfile
from dataclasses import dataclass

import numpy as np

from .runtime import ImageError, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
_BATCHES = 2  # Philox key stream for the batch order (the directions use 1)


class AdaptDataError(ValueError):
    """The adaptation data is missing, empty, of the wrong size or labelled with unknown classes."""


@dataclass
class Images:
    pixels: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray | None  # int64 [N], indices into the model's class names, or None (unlabelled)

    def __len__(self) -> int:
        return len(self.pixels)

    def take(self, index: np.ndarray) -> "Images":
        return Images(self.pixels[index], None if self.labels is None else self.labels[index])


@dataclass
class AdaptData:
    adapt: Images
    held_out: Images
    fingerprint: str  # sha256 over the files' names and bytes, in the order read


def _read_files(path: pathlib.Path) -> list[tuple[str, bytes]]:
    """(relative path, bytes) of every image under ``path`` (folder or archive), sorted by path."""
    files = []
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f.relative_to(path).as_posix(), f.read_bytes()))
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                        files.append((member.name, tar.extractfile(member).read()))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise AdaptDataError(f"--data {path}: not a folder or a readable .tar/.tar.gz archive ({exc})") from None
        files.sort()
    else:
        raise AdaptDataError(f"--data {path}: no such folder or archive")
    if not files:
        raise AdaptDataError(f"--data {path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def _decode(files, class_names, labelled: bool, size: tuple[int, int], where: str) -> Images:
    pixels, labels = [], []
    for name, data in files:
        try:
            image = _exact_size(data, size, name)
        except ImageError as exc:
            raise AdaptDataError(f"{where}: {name}: {exc}") from None
        pixels.append(image)
        parts = pathlib.PurePosixPath(name).parts
        labels.append(class_names.index(parts[-2]) if len(parts) >= 2 and parts[-2] in class_names else -1)
    labels = np.asarray(labels, np.int64)
    if labelled and (labels < 0).any():
        bad = files[int(np.argmax(labels < 0))][0]
        raise AdaptDataError(
            f"{where}: {bad} is not in a folder named after one of the model's classes "
            f"({', '.join(class_names)}); put images in <class>/ folders, or pass --unlabelled"
        )
    return Images(np.stack(pixels), labels if (labels >= 0).all() else None)


def _exact_size(data: bytes, size: tuple[int, int], name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if (img.height, img.width) != size:
                raise ImageError(
                    f"a {img.width}x{img.height} image, but the model takes {size[1]}x{size[0]}: resize the "
                    "images first (adaptation must see what the deployed model is fed)"
                )
    except ImageError:
        raise
    except (OSError, ValueError) as exc:
        raise ImageError(f"unreadable image ({type(exc).__name__})") from None
    return load_image(data, *size)


def load_adapt_data(
    path, class_names, size: tuple[int, int], labelled: bool, eval_fraction: float = 0.2, seed: int = 0
) -> AdaptData:
    """Read ``path`` (module docstring) into the adaptation and held-out parts."""
    path = pathlib.Path(path)
    files = _read_files(path)
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())

    def strip(prefix):
        return [(name.split("/", 1)[1], data) for name, data in files if name.split("/", 1)[0] == prefix]

    top = {pathlib.PurePosixPath(name).parts[0] for name, _ in files}
    class_names = list(class_names)
    if {"adapt", "eval"} <= top:
        adapt = _decode(strip("adapt"), class_names, labelled, size, f"{path}/adapt")
        held_out = _decode(strip("eval"), class_names, labelled, size, f"{path}/eval")
    else:
        if not 0 < eval_fraction < 1:
            raise AdaptDataError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
        images = _decode(files, class_names, labelled, size, str(path))
        if len(images) < 2:
            raise AdaptDataError(f"--data {path}: {len(images)} image; adaptation needs at least 2")
        order = np.random.Generator(np.random.Philox(key=np.array([seed, _BATCHES + 1], np.uint64))).permutation(
            len(images)
        )
        cut = max(1, int(round(len(images) * eval_fraction)))
        held_out, adapt = images.take(np.sort(order[:cut])), images.take(np.sort(order[cut:]))
    return AdaptData(adapt, held_out, digest.hexdigest())


def batch_indices(count: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The examples of step ``step``: epochs of a seeded permutation, so a resumed run draws what an
    uninterrupted one would."""
    per_epoch = max(1, count // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.Generator(
        np.random.Philox(key=np.array([seed, _BATCHES], np.uint64), counter=np.array([epoch, 0, 0, 0], np.uint64))
    ).permutation(count)
    start = position * batch_size
    return order[start : start + batch_size] if count >= batch_size else order
