"""Per-channel statistics of an export's layers on its training data: what an unlabelled adaptation aligns
the shifted data's statistics to (``subgrad adapt --objective foa``), recorded so that the training set
need not travel with the model.

For every Conv and Gemm layer but the last (:func:`subgrad.export.adapt_graph.layers`), the mean and
variance of its output per channel, over the images and spatial positions, computed in onnxruntime from
the exported graph itself on a seeded subset of the training images.  Stored in the export's metadata
under ``source_statistics`` as ``[{"layer": output name, "mean": [...], "var": [...]}, ...]``.
Torch-free.
"""

from __future__ import annotations

import numpy as np
import onnx

from . import adapt_graph
from .runtime import ModelInfo, require_onnxruntime, session_options

KEY = "source_statistics"
#: Training images the statistics are computed on (seeded subset; enough for per-channel moments).
IMAGES = 2048


def compute(model: onnx.ModelProto, info: ModelInfo, pixels: np.ndarray, batch_size: int = 256) -> list[dict]:
    """Statistics of ``model``'s layers on uint8 NHWC ``pixels`` (all of them; pick the subset first)."""
    private = adapt_graph.private_graph(model, [], statistics=True)
    session = require_onnxruntime().InferenceSession(
        private.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in private.graph.output if o.name.startswith(adapt_graph.STATS_PREFIX)]
    sums = [np.zeros(0)] * len(names)
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        values = session.run(names, {info.input_name: info.prepare(chunk)})
        sums = [
            s + v.astype(np.float64) * len(chunk) if s.size else v.astype(np.float64) * len(chunk)
            for s, v in zip(sums, values)
        ]
    layers = adapt_graph.layers(model)[:-1]
    out = []
    for k, layer in enumerate(layers):
        mean, sqmean = sums[2 * k] / len(pixels), sums[2 * k + 1] / len(pixels)
        out.append(
            dict(layer=layer.output, mean=mean.round(6).tolist(), var=np.maximum(sqmean - mean**2, 0).round(6).tolist())
        )
    return out


def subset(images: np.ndarray, count: int = IMAGES, seed: int = 0) -> np.ndarray:
    """A seeded choice of ``count`` images (training sets are often stored sorted by class)."""
    order = np.random.Generator(np.random.Philox(key=np.array([seed, 3], np.uint64))).permutation(len(images))
    return images[np.sort(order[:count])]
