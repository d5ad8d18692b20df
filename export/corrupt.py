"""A shifted-data scenario from the real CIFAR-10 test set, no download: deterministic corruptions after
the CIFAR-10-C recipe (Hendrycks & Dietterich, ICLR 2019), written as image folders for ``subgrad adapt``.

Each corruption takes uint8 [N, 32, 32, 3] images and a severity 1-5 (the recipe's parameters for
32x32 images; 5, the strongest, is what test-time adaptation papers report):

* ``gaussian_noise``: add N(0, c^2) to pixels in [0, 1], c = .04 .06 .08 .09 .10;
* ``defocus_blur``: convolve with a disk of radius r smoothed by a Gaussian of sigma a (reflected
  borders), (r, a) = (.3, .4) (.4, .5) (.5, .6) (1, .2) (1.5, .1);
* ``contrast``: pull each image's pixels towards its per-channel mean, factor .75 .5 .4 .3 .15;
* ``jpeg_compression``: JPEG at quality 80 65 58 50 40 (Pillow's encoder).

The noise of image i is drawn from numpy's Philox keyed by (seed, i), so every run writes the same
files.  :func:`write_scenario` splits the test set in two halves, ``adapt/`` (what adaptation sees) and
``eval/`` (where it is measured), each ``<class>/<index>.png``, for the clean images and every corruption.
Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np

SEVERITIES = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "jpeg_compression": (80, 65, 58, 50, 40),
}
CORRUPTIONS = tuple(SEVERITIES)
DEFAULT_SEVERITY = 5


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, c: float, seed: int, indices) -> np.ndarray:
    out = np.empty_like(images)
    for i, (index, image) in enumerate(zip(indices, images)):
        rng = np.random.Generator(np.random.Philox(key=np.array([seed, index], np.uint64)))
        noisy = image / 255.0 + rng.normal(0.0, c, image.shape)
        out[i] = _to_uint8(np.clip(noisy, 0, 1) * 255)
    return out


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The recipe's kernel: a disk of ``radius`` on a 17x17 grid, Gaussian-smoothed (3x3, sigma ``alias_blur``),
    normalised to sum 1."""
    span = np.arange(-8, 9)
    xx, yy = np.meshgrid(span, span)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_blur**2))
    taps /= taps.sum()
    padded = np.pad(disk, 1)
    rows = sum(taps[k] * padded[k : k + 17, 1:-1] for k in range(3))
    padded = np.pad(rows, ((0, 0), (1, 1)))
    smooth = sum(taps[k] * padded[:, k : k + 17] for k in range(3))
    return smooth / smooth.sum()


def defocus_blur(images: np.ndarray, radius: float, alias_blur: float) -> np.ndarray:
    kernel = _disk_kernel(radius, alias_blur)
    support = np.argwhere(np.abs(kernel) > 1e-12)
    x = images.astype(np.float64) / 255.0
    padded = np.pad(x, ((0, 0), (8, 8), (8, 8), (0, 0)), mode="reflect")  # cv2's default border (reflect 101)
    h, w = images.shape[1:3]
    out = np.zeros_like(x)
    for dy, dx in support:
        out += kernel[dy, dx] * padded[:, dy : dy + h, dx : dx + w]
    return _to_uint8(np.clip(out, 0, 1) * 255)


def contrast(images: np.ndarray, c: float) -> np.ndarray:
    x = images.astype(np.float64) / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return _to_uint8(np.clip((x - means) * c + means, 0, 1) * 255)


def jpeg_compression(images: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


def check(names, severity: int) -> None:
    unknown = [n for n in names if n not in SEVERITIES]
    if unknown:
        raise ValueError(f"unknown corruption {', '.join(unknown)}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in range(1, 6):
        raise ValueError(f"severity must be 1..5, got {severity}")


def corrupt(images: np.ndarray, name: str, severity: int = DEFAULT_SEVERITY, seed: int = 0, indices=None) -> np.ndarray:
    """``images`` (uint8 NHWC) under corruption ``name`` at ``severity``; ``indices`` (default 0..N-1)
    number the images: image i's noise is drawn from its own stream, so a subset gets the same pixels."""
    check([name], severity)
    c = SEVERITIES[name][severity - 1]
    if name == "gaussian_noise":
        return gaussian_noise(images, c, seed, range(len(images)) if indices is None else indices)
    if name == "defocus_blur":
        return defocus_blur(images, *c)
    if name == "contrast":
        return contrast(images, c)
    return jpeg_compression(images, c)


def write_scenario(
    images: np.ndarray,
    labels: np.ndarray,
    class_names,
    out,
    corruptions=CORRUPTIONS,
    severity: int = DEFAULT_SEVERITY,
    seed: int = 0,
    limit: int | None = None,
) -> dict:
    """Write ``out/<clean|corruption>/{adapt,eval}/<class>/<index>.png``: a seeded half of the images
    adapts, the other half evaluates (a permutation: image sets are often sorted by class).  Returns
    {folder: image count}.  ``limit`` keeps a seeded subset of that many images."""
    from PIL import Image

    check(corruptions, severity)
    out = pathlib.Path(out)
    order = np.random.Generator(np.random.Philox(key=np.array([seed, 1 << 32], np.uint64))).permutation(len(images))
    chosen = np.sort(order[:limit]) if limit is not None else np.arange(len(images))
    if len(chosen) < 2:
        raise ValueError(f"the scenario needs at least 2 images, got {len(chosen)}")
    split = order[np.isin(order, chosen)]
    half = len(split) // 2
    written = {}
    for name in ("clean", *corruptions):
        shifted = images[chosen] if name == "clean" else corrupt(images[chosen], name, severity, seed, chosen)
        row = {int(i): k for k, i in enumerate(chosen)}
        for part, index in (("adapt", np.sort(split[:half])), ("eval", np.sort(split[half:]))):
            for i in index:
                folder = out / name / part / class_names[int(labels[i])]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(shifted[row[int(i)]]).save(folder / f"{i:05d}.png")
        written[name] = len(chosen)
    return written
