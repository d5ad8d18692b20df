"""Deploy runtime: classify images with an exported subgrad model, without torch.

Imports only onnxruntime, numpy and Pillow, so a serving image needs none of the training stack
(``tests/test_export.py`` checks that importing this module does not import torch).  It imports nothing
of subgrad either: ``subgrad package --backend python`` copies this file verbatim beside the served
model (``subgrad_runtime.py``), so a Triton model repository runs without subgrad installed.

    from subgrad.export.runtime import Predictor
    predictor = Predictor("model.onnx")
    predictor.predict(["cat.png", png_bytes, pil_image, uint8_array], top_k=3)
    # [[("cat", 0.91), ("dog", 0.05), ("frog", 0.01)], ...]

Preprocessing is the training pipeline's, read from the model's metadata: RGB, 32x32 (other sizes are
resized, bilinear), ``(pixel - 255 * mean) / (255 * std)`` per channel in float32, NCHW.  A model
exported with ``--with-preprocessing`` does that in its graph and takes raw NHWC uint8 pixels.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from dataclasses import dataclass

import numpy as np


class MissingOnnxRuntimeError(ImportError):
    """onnxruntime is not installed."""


def require_onnxruntime():
    """Import and return ``onnxruntime``, or raise a one-line error naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingOnnxRuntimeError(
            "onnxruntime is not installed: pip install 'subgrad[cpu]' (CPU) or 'subgrad[gpu]' "
            "(NVIDIA GPU, onnxruntime-gpu); never both"
        ) from exc
    return onnxruntime


#: Value of the ``subgrad.format`` metadata key; bump when the keys below change meaning.
METADATA_FORMAT = "subgrad-onnx-1"


class ModelFileError(ValueError):
    """The file is missing, not ONNX, or not a subgrad export (the message says which)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a deployer needs to feed the model, from its ``metadata_props``."""

    class_names: list[str]
    mean: list[float]  # per channel, in [0, 1] pixel units
    std: list[float]
    height: int
    width: int
    input_name: str
    input_layout: str  # "NCHW" (float32, normalised) or "NHWC" (uint8, preprocessing in the graph)
    preprocessing_in_graph: bool
    model_name: str
    raw: dict  # every metadata key, JSON values decoded

    @classmethod
    def from_props(cls, props: dict[str, str], where: str) -> "ModelInfo":
        if props.get("subgrad.format") != METADATA_FORMAT:
            raise ModelFileError(
                f"{where} has no subgrad metadata (subgrad.format != {METADATA_FORMAT!r}); "
                "export it with `subgrad export RUN_DIR --out model.onnx`"
            )
        raw = {}
        for key, value in props.items():
            try:
                raw[key] = json.loads(value)
            except ValueError:
                raw[key] = value
        size = raw["input_size"]
        return cls(
            class_names=list(raw["class_names"]),
            mean=list(raw["mean"]),
            std=list(raw["std"]),
            height=int(size["height"]),
            width=int(size["width"]),
            input_name=raw["input_name"],
            input_layout=raw["input_layout"],
            preprocessing_in_graph=bool(raw["preprocessing_in_graph"]),
            model_name=raw["model_name"],
            raw=raw,
        )

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NHWC pixels at the model's size -> what the model's input takes."""
        if self.preprocessing_in_graph:
            return np.ascontiguousarray(pixels)
        return normalize(pixels, self.mean, self.std)


def session_options(threads: int | None = None):
    """The onnxruntime SessionOptions every subgrad session uses: errors only in the log, and ``threads``
    intra-op threads (one inter-op) when given."""
    options = require_onnxruntime().SessionOptions()
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def open_session(model_path, providers=None, threads: int | None = None):
    """An onnxruntime InferenceSession, or a one-line ModelFileError for a missing/corrupt/non-ONNX file.

    ``providers`` defaults to CUDA then CPU when onnxruntime has CUDA, else CPU; onnxruntime falls back
    to the next provider in the list when one cannot be created.
    """
    ort = require_onnxruntime()
    path = pathlib.Path(model_path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    options = session_options(threads)
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types for these
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path} is not a loadable ONNX model ({first[:200]})") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class ImageError(ValueError):
    """An input image could not be read or has the wrong shape."""


#: Largest encoded image decoded (width x height): 4096 x 4096, 48 MiB as RGB.  A few hundred bytes of
#: PNG can declare far more (a decompression bomb), and a served model decodes what clients send; the
#: size is read from the file's header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 4096 * 4096


def load_image(image, height: int = 32, width: int = 32) -> np.ndarray:
    """One image (path, encoded file bytes, PIL image or uint8 HWC/HW array) as uint8 [height, width, 3] RGB."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        encoded = not isinstance(image, (str, os.PathLike))
        where = f"{len(image)} bytes" if encoded else image
        try:
            with Image.open(io.BytesIO(image) if encoded else image) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageError(
                        f"{where}: a {img.width} x {img.height} image, over the limit of {MAX_IMAGE_PIXELS:,} "
                        "pixels decoded per image; send smaller images"
                    )
                img.load()
                image = img.convert("RGB")
        except ImageError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            detail = "not a JPEG, PNG or other image file Pillow reads" if encoded else str(exc)[:120]
            raise ImageError(f"{where}: unreadable image ({type(exc).__name__}: {detail})") from None
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ImageError(f"array images must be uint8 pixels (0..255), got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageError(f"array images must be HxWx3 (RGB) uint8, got shape {array.shape}")
    if array.shape[2] == 4 or array.shape[:2] != (height, width):
        return load_image(Image.fromarray(array), height, width)
    return array


def normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, ``(x - 255 mean) / (255 std)``: the float32 ops of training's loader."""
    mean255 = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255)
    std255 = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255)
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32)
    return np.ascontiguousarray((x - mean255) / std255)


class Predictor:
    """Top-k classification with an exported subgrad model (see the module docstring).

    Args:
        model_path: an ONNX file written by ``subgrad export`` (or ``subgrad quantize``).
        providers: onnxruntime execution providers (default: CUDA when available, else CPU).
        batch_size: images per ``session.run`` call; longer inputs are split internally.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    """

    def __init__(self, model_path, providers=None, batch_size: int = 64, threads: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.session = open_session(model_path, providers, threads)
        self.info = ModelInfo.from_props(self.session.get_modelmeta().custom_metadata_map, str(model_path))
        self.batch_size = batch_size
        self.output_name = self.session.get_outputs()[0].name

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NHWC pixels -> what the model's input takes (:meth:`ModelInfo.prepare`)."""
        return self.info.prepare(pixels)

    def logits(self, images) -> np.ndarray:
        """Raw logits [N, classes] for a list of images (paths, encoded bytes, PIL images, uint8 arrays)."""
        pixels = (
            np.stack([load_image(im, self.info.height, self.info.width) for im in images])
            if len(images)
            else np.zeros((0, self.info.height, self.info.width, 3), np.uint8)
        )
        return self.logits_from_pixels(pixels)

    def logits_from_pixels(self, pixels: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Raw logits for uint8 NHWC pixels already at the model's size, ``batch_size`` (default: the
        predictor's) images per run."""
        batch_size = batch_size or self.batch_size
        out = []
        for i in range(0, len(pixels), batch_size):
            feed = {self.info.input_name: self.preprocess(pixels[i : i + batch_size])}
            out.append(self.session.run([self.output_name], feed)[0])
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    def predict(self, images, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """For each image, the ``top_k`` (label, probability) pairs, most probable first."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        probs = softmax(self.logits(images))
        k = max(1, min(top_k, probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[j], float(p[j])) for j in row] for p, row in zip(probs, order)]
