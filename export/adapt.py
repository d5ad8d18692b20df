"""Forward-only adaptation of an exported model inside onnxruntime: no torch, no gradient graph.

    from subgrad.export.adapt import Adapter
    adapter = Adapter("model.onnx", params="affine")      # the file on disk is untouched
    for pixels, labels in batches:                        # uint8 NHWC at the model's size
        adapter.step(pixels, labels)                      # labels=None: an unlabelled objective
    adapter.write("adapted.onnx", {"steps": adapter.step_count})

Imports onnxruntime, numpy and ``onnx`` (to edit the graph) only; ``tests/test_adapt.py`` checks that no
torch module loads.  The chosen parameters (:mod:`subgrad.export.adapt_graph`) become inputs of a private
copy of the graph and live in one flat float32 buffer ``theta``.  A step draws q seeded directions ``z_k``
(numpy's Philox keyed by ``(seed, step, k)``: a direction is a seed, never stored) and runs central
differences through one session:

    c_k = clip((L(theta + eps z_k) - L(theta - eps z_k)) / (2 eps)),   g = (1/q) sum_k c_k z_k

then Adam (or momentum SGD) on ``g``.  A non-finite loss skips the step (``skipped`` counts them).

Objectives: ``cross_entropy`` (labelled); ``entropy`` of the predictions (TENT's, unlabelled); ``foa``:
entropy plus ``align`` times the distance of each layer's per-channel mean and standard deviation from
the training data's (``source_statistics`` in the export's metadata), as FOA (Niu et al., ICML 2024).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from subgrad.run_folder import atomic_write

from . import adapt_graph
from .runtime import ModelFileError, ModelInfo, require_onnxruntime, session_options

OBJECTIVES = ("cross_entropy", "entropy", "foa")
#: Adam's lr per objective on ``affine`` (ResNet-20, 200 steps at batch 64, q 4; benchmarks/LOG.md 2026-12-07):
#: cross-entropy 1e-2 (noise 54 -> 68%, contrast 22 -> 59%; 3e-3: 68% / 52%; 3e-2 diverges), foa 3e-3
#: (noise 54 -> 69%, contrast 22 -> 51%), entropy as foa.
DEFAULT_LR = {"cross_entropy": 1e-2, "foa": 3e-3, "entropy": 3e-3}
#: The objective of unlabelled data when none is named: entropy alone collapses the predictions onto a few
#: classes (docs/adapt.md, benchmarks/README.md "Adapting an export").
UNLABELLED_OBJECTIVE = "foa"
#: Metadata key of the per-layer channel statistics on the training data (written by ``subgrad export``).
SOURCE_STATISTICS = "source_statistics"
_DIRECTIONS = 1  # Philox key stream for the directions (batches use another, in adapt_data)


@dataclass(frozen=True)
class AdaptSettings:
    """How an Adapter steps; one home for every default (``subgrad adapt`` reads them here)."""

    params: str = "affine"
    objective: str = "cross_entropy"
    q: int = 4
    eps: float = 1e-2
    lr: float | None = None  # None: DEFAULT_LR of the objective
    optimizer: str = "adam"  # or "sgd" (momentum)
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    distribution: str = "rademacher"  # or "gaussian"
    clip: float | None = None
    # weight of foa's statistics term: at 1 entropy dominates and collapses the predictions (ResNet-20,
    # noise: 54% -> 10% in 200 steps); at 20 and above alignment leads (54% -> 69%; LeNet: the same from 20
    # to 200) -- benchmarks/LOG.md, 2026-12-07
    align: float = 20.0
    seed: int = 0

    def check(self) -> "AdaptSettings":
        """These settings with the objective's lr filled in, or a ValueError naming every bad field."""
        if self.lr is None and self.objective in DEFAULT_LR:
            return dataclasses.replace(self, lr=DEFAULT_LR[self.objective]).check()
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not (isinstance(self.q, int) and self.q >= 1):
            problems.append(f"q must be a whole number >= 1, got {self.q!r}")
        for name in ("eps", "lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                problems.append(f"{name} must be a number > 0, got {value!r}")
        if self.optimizer not in ("adam", "sgd"):
            problems.append(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.distribution not in ("rademacher", "gaussian"):
            problems.append(f"distribution must be rademacher or gaussian, got {self.distribution!r}")
        if self.clip is not None and not self.clip > 0:
            problems.append(f"clip must be None or > 0, got {self.clip!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            problems.append(f"seed must be a whole number in [0, 2**63), got {self.seed!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def philox(seed: int, stream: int, a: int, b: int = 0) -> np.random.Generator:
    """numpy's Philox keyed by ``(seed, stream)`` at counter ``(a, b)``: one independent stream per use."""
    return np.random.Generator(
        np.random.Philox(key=np.array([seed, stream], np.uint64), counter=np.array([a, b, 0, 0], np.uint64))
    )


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(path: pathlib.Path) -> onnx.ModelProto:
    """The ONNX file at ``path``, or a one-line ModelFileError (one session only is opened: the private
    graph's, so adapting holds no second copy of the model in onnxruntime)."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)  # subgrad exports keep weights inside
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError, ...: all mean "not a loadable model"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path} is not a loadable ONNX model ({first})") from None
    return model


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-_log_softmax(logits)[np.arange(len(labels)), labels].mean())


def entropy(logits: np.ndarray) -> float:
    logp = _log_softmax(logits)
    return float(-(np.exp(logp) * logp).sum(axis=1).mean())


class Adapter:
    """Zeroth-order adaptation of the parameters ``settings.params`` names (module docstring).

    Args:
        model_path: an ONNX file written by ``subgrad export`` or ``subgrad quantize`` (or adapted before).
        settings: an :class:`AdaptSettings`, or its fields as keywords.
        providers: onnxruntime execution providers (default CPU: the provider tested and measured; others
            are best effort, since weights fed as inputs lose constant folding and some fusions).
        threads: onnxruntime intra-op threads; a resumed run continues bit for bit only with the same count.
    """

    def __init__(self, model_path, settings: AdaptSettings | None = None, *, providers=None, threads=None, **kw):
        if settings is not None and kw:
            raise TypeError("pass settings= or its fields as keywords, not both")
        self.settings = (settings or AdaptSettings(**kw)).check()
        self.model_path = pathlib.Path(model_path)
        self.threads = threads
        self.model = load_model(self.model_path)
        self.info = ModelInfo.from_props({p.key: p.value for p in self.model.metadata_props}, str(self.model_path))
        self.model_sha256 = file_sha256(self.model_path)
        self.params = adapt_graph.select(self.model, self.settings.params)
        self.source = self._source_statistics() if self.settings.objective == "foa" else None
        private = adapt_graph.private_graph(self.model, self.params, statistics=self.source is not None)
        self.session = self._open(private, providers, threads)
        self.outputs = [o.name for o in private.graph.output]
        self.offsets = np.cumsum([0] + [int(np.prod(p.shape)) for p in self.params])
        self.theta = np.concatenate([p.initial.reshape(-1) for p in self.params]).astype(np.float32)
        self._work = np.empty_like(self.theta)
        self.moment1 = np.zeros_like(self.theta)
        self.moment2 = np.zeros_like(self.theta) if self.settings.optimizer == "adam" else None
        self.step_count = 0
        self.skipped = 0

    # -- set-up ------------------------------------------------------------------------------------
    def _open(self, private: onnx.ModelProto, providers, threads):
        ort = require_onnxruntime()
        try:
            return ort.InferenceSession(
                private.SerializeToString(),
                sess_options=session_options(threads),
                providers=providers or ["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime's own error types
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"{self.model_path}: the adaptable graph does not load ({first})") from None

    def _source_statistics(self) -> list[tuple[np.ndarray, np.ndarray]]:
        stats = self.info.raw.get(SOURCE_STATISTICS)
        layer_count = len(adapt_graph.layers(self.model)) - 1
        if not isinstance(stats, list) or len(stats) != layer_count:
            raise ValueError(
                f"{self.model_path} carries no training-data statistics ({SOURCE_STATISTICS}), which the foa "
                "objective aligns to: export the run again with `subgrad export RUN --out FILE` (it records "
                "them from the run's data), or use --objective entropy"
            )
        return [(np.asarray(s["mean"], np.float64), np.sqrt(np.asarray(s["var"], np.float64))) for s in stats]

    # -- forward passes ----------------------------------------------------------------------------
    def _feed(self, x: np.ndarray, flat: np.ndarray) -> dict:
        feed = {self.info.input_name: x}
        for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
            feed[p.name] = flat[a:b].reshape(p.shape)
        return feed

    def _objective(self, x: np.ndarray, labels, flat: np.ndarray) -> float:
        out = self.session.run(self.outputs, self._feed(x, flat))
        logits = out[0]
        if self.settings.objective == "cross_entropy":
            return cross_entropy(logits, labels)
        value = entropy(logits)
        if self.settings.objective == "foa":
            distance = 0.0
            for (mean_s, std_s), mean, sqmean in zip(self.source, out[1::2], out[2::2]):
                mean = mean.astype(np.float64)
                std = np.sqrt(np.maximum(sqmean - mean * mean, 0.0))
                distance += (np.linalg.norm(mean - mean_s) + np.linalg.norm(std - std_s)) / np.sqrt(len(mean))
            value += self.settings.align * distance / len(self.source)
        return value

    def _check_batch(self, pixels, labels):
        if self.settings.objective == "cross_entropy" and labels is None:
            raise ValueError("the cross_entropy objective needs labels; pass labels or an unlabelled objective")
        if labels is not None:
            labels = np.asarray(labels, np.int64)
            if (
                labels.shape != (len(pixels),)
                or labels.min(initial=0) < 0
                or labels.max(initial=0) >= len(self.info.class_names)
            ):
                raise ValueError(f"labels must be {len(pixels)} class indices in [0, {len(self.info.class_names)})")
        return self.info.prepare(pixels), labels

    def objective(self, pixels: np.ndarray, labels=None) -> float:
        """The objective at the current parameters on uint8 NHWC ``pixels``."""
        x, labels = self._check_batch(pixels, labels)
        return self._objective(x, labels, self.theta)

    def logits(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits at the current parameters, ``batch_size`` images per run."""
        flat = self.theta
        out = [
            self.session.run(self.outputs[:1], self._feed(self.info.prepare(pixels[i : i + batch_size]), flat))[0]
            for i in range(0, len(pixels), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.info.class_names)), np.float32)

    # -- the step ----------------------------------------------------------------------------------
    def direction(self, step: int, k: int) -> np.ndarray:
        """Direction ``k`` of step ``step``: regenerated from the seed, never stored."""
        rng = philox(self.settings.seed, _DIRECTIONS, step, k)
        if self.settings.distribution == "rademacher":
            z = rng.integers(0, 2, self.theta.size, dtype=np.int8).astype(np.float32)
            return z * np.float32(2) - np.float32(1)
        return rng.standard_normal(self.theta.size, dtype=np.float32)

    def step(self, pixels: np.ndarray, labels=None) -> float:
        """One zeroth-order step on a batch; returns the mean of the perturbed losses (nan when skipped)."""
        s = self.settings
        x, labels = self._check_batch(pixels, labels)
        eps = np.float32(s.eps)
        estimate = np.zeros_like(self.theta)
        losses = []
        for k in range(s.q):
            z = self.direction(self.step_count, k)
            np.add(self.theta, eps * z, out=self._work)
            plus = self._objective(x, labels, self._work)
            np.subtract(self.theta, eps * z, out=self._work)
            minus = self._objective(x, labels, self._work)
            if not (np.isfinite(plus) and np.isfinite(minus)):
                self.skipped += 1
                self.step_count += 1
                return float("nan")
            c = (plus - minus) / (2 * s.eps)
            if s.clip is not None:
                c = min(max(c, -s.clip), s.clip)
            estimate += np.float32(c / s.q) * z
            losses += [plus, minus]
        self._update(estimate)
        self.step_count += 1
        return float(np.mean(losses))

    def _update(self, g: np.ndarray) -> None:
        s = self.settings
        if s.optimizer == "sgd":
            self.moment1 *= np.float32(s.momentum)
            self.moment1 += g
            self.theta -= np.float32(s.lr) * self.moment1
            return
        b1, b2 = s.betas
        t = self.step_count + 1
        self.moment1 *= np.float32(b1)
        self.moment1 += np.float32(1 - b1) * g
        self.moment2 *= np.float32(b2)
        self.moment2 += np.float32(1 - b2) * g * g
        m_hat = self.moment1 / np.float32(1 - b1**t)
        v_hat = self.moment2 / np.float32(1 - b2**t)
        self.theta -= np.float32(s.lr) * m_hat / (np.sqrt(v_hat) + np.float32(1e-8))

    # -- state and output --------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a resumed run needs, as arrays and a JSON-able record."""
        arrays = {"theta": self.theta, "moment1": self.moment1}
        if self.moment2 is not None:
            arrays["moment2"] = self.moment2
        record = dict(
            settings=asdict(self.settings),
            step=self.step_count,
            skipped=self.skipped,
            threads=self.threads,
            model_sha256=self.model_sha256,
            params=[p.name for p in self.params],
        )
        return dict(arrays=arrays, record=record)

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state`; refuses a state made with other settings, model or thread count."""
        record = state["record"]
        mine = self.state()["record"]
        for key, why in (
            ("model_sha256", "it adapted another model file"),
            ("settings", "it was made with other settings"),
            ("params", "it adapts other parameters"),
            (
                "threads",
                "a different thread count changes onnxruntime's sums, so the run would not continue bit for bit",
            ),
        ):
            if json.loads(json.dumps(record[key])) != json.loads(json.dumps(mine[key])):
                raise ValueError(f"cannot resume: {why} ({key}: saved {record[key]!r}, now {mine[key]!r})")
        for name, array in state["arrays"].items():
            target = getattr(self, name)
            if target is None or array.shape != target.shape:
                raise ValueError(f"cannot resume: the saved {name} has shape {array.shape}, expected {target.shape}")
            target[...] = array
        self.step_count, self.skipped = int(record["step"]), int(record["skipped"])

    def values(self) -> dict[str, np.ndarray]:
        """{parameter name: current value} as the graph holds it."""
        return {
            p.name: self.theta[a:b].reshape(p.shape).copy()
            for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:])
        }

    def adapted_model(self, adaptation: dict | None = None) -> onnx.ModelProto:
        """The model with the adapted values written in (adapt_graph.written_model) and, under the
        ``adaptation`` metadata key, what was adapted."""
        model = adapt_graph.written_model(self.model, self.params, self.values())
        record = dict(
            params=self.settings.params,
            objective=self.settings.objective,
            steps=self.step_count,
            skipped=self.skipped,
            source_sha256=self.model_sha256,
            settings=asdict(self.settings),
        )
        record.update(adaptation or {})
        props = [p for p in model.metadata_props if p.key != "adaptation"]
        del model.metadata_props[:]
        model.metadata_props.extend(props)
        model.metadata_props.add(key="adaptation", value=json.dumps(record))
        return model

    def write(self, out, adaptation: dict | None = None) -> pathlib.Path:
        """Write the adapted model to ``out`` atomically (temp file beside it, then rename)."""
        model = self.adapted_model(adaptation)
        onnx.checker.check_model(model)
        data = model.SerializeToString()
        return atomic_write(out, lambda tmp: tmp.write_bytes(data))
