"""``subgrad adapt``: the private graph, the written file, the step, resume and bad input.

Fast tier: untrained LeNet and ResNet-20 exports (seeded weights) and random images written as a tiny
image-folder dataset, so nothing reads the real archive (test_adapt_real.py does, in the slow tier).
Tolerances: the private graph (weights fed as inputs) against the exported file, |logit difference|
<= 1e-5 (onnxruntime folds constants differently; measured ~1e-7); a folded affine against the Mul and
Add it replaces, <= 1e-4 relative to the largest logit (the product W s rounds once instead of twice).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from subgrad.data import CIFAR10_CLASSES
from subgrad.export import adapt_graph
from subgrad.export.adapt import Adapter, AdaptSettings
from subgrad.export.adapt_run import adapt_file, state_folder
from subgrad.export.runtime import Predictor

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def _pixels(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def _write_folder(root: pathlib.Path, pixels: np.ndarray, labels) -> pathlib.Path:
    for i, (image, label) in enumerate(zip(pixels, labels)):
        folder = root / CIFAR10_CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


def _export(name: str, out: pathlib.Path) -> pathlib.Path:
    from subgrad.export import source_stats
    from subgrad.export.exporter import build_metadata, export_module
    from subgrad.export.runtime import ModelInfo
    from subgrad.models import build_model

    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():  # BatchNorm statistics of a trained model's size, so folding is exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2), module.running_var.uniform_(0.5, 2.0)
    record = dict(classes=list(CIFAR10_CLASSES), mean=MEAN, std=STD, model=name)
    metadata = build_metadata(record, {}, False, 18)

    def stats(proto):
        info = ModelInfo.from_props(metadata, "test")
        return {source_stats.KEY: json.dumps(source_stats.compute(proto, info, _pixels(64, 1)))}

    return export_module(model, out, metadata, name=name, more_metadata=stats)


class _Exports(dict):
    """{model: export}, each exported on first use (ResNet-20's export takes ~20 s: its cases are slow)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        self[name] = _export(name, self.root / f"{name}.onnx")
        return self[name]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return _Exports(tmp_path_factory.mktemp("adapt-exports"))


MODELS = ["lenet", pytest.param("resnet20", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def int8_export(exports, tmp_path_factory):
    """The LeNet export quantized by ``subgrad quantize`` (INT8 QDQ) on a tiny random image-folder dataset."""
    from subgrad.export.quantize import quantize

    root = tmp_path_factory.mktemp("tiny-cifar")
    labels = np.arange(40) % 10
    _write_folder(root / "train", _pixels(40, 2), labels)
    _write_folder(root / "test", _pixels(40, 3), labels)
    out = root / "lenet.int8.onnx"
    report = quantize(exports["lenet"], root, out, max_drop=100.0, calibration_images=16)
    assert report["written"], report
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A labelled image folder with adapt/ and eval/ parts (random pixels, labels 0..9)."""
    root = tmp_path_factory.mktemp("adapt-data")
    _write_folder(root / "adapt", _pixels(48, 4), np.arange(48) % 10)
    _write_folder(root / "eval", _pixels(20, 5), np.arange(20) % 10)
    return root


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("params", ["head", "affine", "all", "last:2", "*conv1*", "affine,head"])
def test_private_graph_gives_the_exported_logits(exports, model, params):
    pixels = _pixels(6, 7)
    expected = Predictor(exports[model], ["CPUExecutionProvider"]).logits_from_pixels(pixels)
    adapter = Adapter(exports[model], params=params)
    assert adapter.theta.size > 0
    diff = np.abs(adapter.logits(pixels) - expected).max()
    assert diff <= 1e-5, f"{model} {params}: private graph differs from the export by {diff}"
    assert onnx.load(str(exports[model])).SerializeToString() == pathlib.Path(exports[model]).read_bytes()


@pytest.mark.parametrize("model", [*MODELS, "int8"])
@pytest.mark.parametrize("params", ["affine", "head", "last:1,affine"])
def test_written_model_computes_what_the_adapter_did(exports, int8_export, tmp_path, model, params):
    path = int8_export if model == "int8" else exports[model]
    if model == "int8" and params != "affine":
        with pytest.raises(adapt_graph.SelectionError, match="int8 weights"):
            Adapter(path, params=params)
        return
    adapter = Adapter(path, params=params)
    adapter.theta += np.random.default_rng(8).normal(0, 0.05, adapter.theta.size).astype(np.float32)
    pixels = _pixels(6, 9)
    expected = adapter.logits(pixels)
    out = adapter.write(tmp_path / "adapted.onnx", {"note": "test"})
    written = onnx.load(str(out))
    assert [i.name for i in written.graph.input] == [i.name for i in onnx.load(str(path)).graph.input]
    got = Predictor(out, ["CPUExecutionProvider"]).logits_from_pixels(pixels)
    bound = 1e-4 * np.abs(expected).max()
    assert np.abs(got - expected).max() <= bound, f"{model} {params}: {np.abs(got - expected).max()} > {bound}"
    meta = {p.key: p.value for p in written.metadata_props}
    assert json.loads(meta["adaptation"])["params"] == params and json.loads(meta["adaptation"])["note"] == "test"
    ops = [n.op_type for n in written.graph.node]
    if model == "int8":  # int8 weights untouched, the affine kept as explicit nodes
        before = {
            t.name: t.raw_data for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.INT8
        }
        after = {t.name: t.raw_data for t in written.graph.initializer if t.name in before}
        assert before == after
        assert ops.count("Mul") > [n.op_type for n in onnx.load(str(path)).graph.node].count("Mul")
    else:  # folded: the same graph as the input
        assert ops == [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nothing.*", "selects no float parameter"),
        ("last:0", "K must be a whole number"),
        ("last:x", "K must be a whole number"),
        (" , ", "--params is empty"),
    ],
)
def test_a_selection_that_selects_nothing_is_refused(exports, spec, message):
    with pytest.raises(adapt_graph.SelectionError, match=message):
        Adapter(exports["lenet"], params=spec)


def test_the_step_is_seeded_and_deterministic(exports):
    pixels, labels = _pixels(16, 10), np.arange(16) % 10
    runs = []
    for _ in range(2):
        adapter = Adapter(exports["lenet"], params="affine", q=2, seed=3)
        for _ in range(3):
            adapter.step(pixels, labels)
        runs.append(adapter.theta.copy())
    assert np.array_equal(runs[0], runs[1])
    other = Adapter(exports["lenet"], params="affine", q=2, seed=4)
    assert not np.array_equal(other.direction(0, 0), Adapter(exports["lenet"], q=2, seed=3).direction(0, 0))
    z = other.direction(5, 1)
    assert np.array_equal(z, other.direction(5, 1)) and set(np.unique(z)) == {-1.0, 1.0}


def test_a_non_finite_loss_skips_the_step(exports, monkeypatch):
    adapter = Adapter(exports["lenet"], params="head")
    before = adapter.theta.copy()
    monkeypatch.setattr(adapter, "_objective", lambda *a: float("nan"))
    assert np.isnan(adapter.step(_pixels(4, 11), np.arange(4)))
    assert adapter.skipped == 1 and adapter.step_count == 1 and np.array_equal(adapter.theta, before)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_continues_bit_for_bit(exports, folder, tmp_path, optimizer):
    settings = AdaptSettings(params="affine", q=2, optimizer=optimizer, lr=1e-3)
    common = dict(batch_size=8, settings=settings, threads=1, progress=False, checkpoint_every=2)
    whole = adapt_file(exports["lenet"], folder, tmp_path / "whole.onnx", steps=6, **common)
    adapt_file(exports["lenet"], folder, tmp_path / "parts.onnx", steps=3, **common)
    parts = adapt_file(exports["lenet"], folder, tmp_path / "parts.onnx", steps=6, resume=True, **common)
    assert whole["after"] == parts["after"]
    a, b = (np.load(state_folder(tmp_path / f"{n}.onnx") / "state.npz") for n in ("whole", "parts"))
    assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_ctrl_c_leaves_no_file_and_the_run_resumes(exports, folder, tmp_path, monkeypatch):
    settings = AdaptSettings(params="head", q=1)
    common = dict(batch_size=8, settings=settings, threads=1, progress=False)
    expected = adapt_file(exports["lenet"], folder, tmp_path / "whole.onnx", steps=5, **common)
    real_step, calls = Adapter.step, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(Adapter, "step", interrupted)
    out = tmp_path / "cut.onnx"
    with pytest.raises(KeyboardInterrupt, match="continue with --resume"):
        adapt_file(exports["lenet"], folder, out, steps=5, **common)
    assert not out.exists() and not list(tmp_path.glob(".cut*"))
    monkeypatch.setattr(Adapter, "step", real_step)
    assert adapt_file(exports["lenet"], folder, out, steps=5, resume=True, **common)["after"] == expected["after"]


def test_a_resume_with_other_settings_is_refused(exports, folder, tmp_path):
    common = dict(batch_size=8, threads=1, progress=False)
    adapt_file(exports["lenet"], folder, tmp_path / "a.onnx", steps=2, settings=AdaptSettings(q=1), **common)
    with pytest.raises(ValueError, match="other settings"):
        adapt_file(
            exports["lenet"], folder, tmp_path / "a.onnx", steps=4, settings=AdaptSettings(q=2), resume=True, **common
        )
    with pytest.raises(ValueError, match="thread count"):
        adapt_file(
            exports["lenet"],
            folder,
            tmp_path / "a.onnx",
            steps=4,
            settings=AdaptSettings(q=1),
            resume=True,
            **dict(common, threads=2),
        )
    with pytest.raises(ValueError, match="earlier run's state"):
        adapt_file(exports["lenet"], folder, tmp_path / "a.onnx", steps=4, settings=AdaptSettings(q=1), **common)


def test_foa_needs_the_training_statistics(exports, tmp_path):
    adapter = Adapter(exports["lenet"], params="affine", objective="foa")
    assert np.isfinite(adapter.objective(_pixels(8, 12)))
    bare = onnx.load(str(exports["lenet"]))
    kept = [p for p in bare.metadata_props if p.key != "source_statistics"]
    del bare.metadata_props[:]
    bare.metadata_props.extend(kept)
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match="no training-data statistics"):
        Adapter(tmp_path / "bare.onnx", objective="foa")


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "subgrad", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_adapts_and_every_deploy_command_takes_the_result(exports, folder, tmp_path):
    out = tmp_path / "adapted.onnx"
    result = _cli(
        "adapt", exports["lenet"], "--data", folder, "--out", out, "--steps", "4", "--batch-size", "8", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    assert "held-out accuracy" in result.stdout and out.is_file()
    image = next((folder / "eval").rglob("*.png"))
    assert _cli("predict", out, image).returncode == 0
    repo = tmp_path / "repo"
    assert _cli("package", out, "--triton-repo", repo).returncode == 0, "package refused the adapted file"
    bench = _cli("bench", out, "--batch-sizes", "2", "--runs", "2", "--warmup", "0", "--threads", "1")
    assert bench.returncode == 0 and "onnx" in bench.stdout, bench.stderr
    again = _cli(
        "adapt", out, "--data", folder, "--out", tmp_path / "twice.onnx", "--steps", "2", "--batch-size", "8", "--quiet"
    )
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not-subgrad", "no subgrad metadata"),
        ("not-onnx", "not a loadable ONNX model"),
        ("wrong-size", "the model takes 32x32"),
        ("unknown-class", "not in a folder named after one of the model's classes"),
        ("same-out", "--out is the input model"),
        ("resume-nothing", "no saved state"),
        ("bad-params", "selects no float parameter"),
        ("no-data", "no such folder or archive"),
        ("no-statistics", "no training-data statistics"),
    ],
)
def test_cli_bad_input_gets_one_line(exports, folder, tmp_path, case, message):
    model, data, extra = exports["lenet"], folder, []
    if case == "not-subgrad":
        proto = onnx.load(str(model))
        del proto.metadata_props[:]
        onnx.save(proto, tmp_path / "plain.onnx")
        model = tmp_path / "plain.onnx"
    elif case == "not-onnx":
        (tmp_path / "junk.onnx").write_bytes(b"not a model")
        model = tmp_path / "junk.onnx"
    elif case == "wrong-size":
        data = tmp_path / "big"
        (data / "cat").mkdir(parents=True)
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(data / "cat" / "x.png")
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(data / "cat" / "y.png")
    elif case == "unknown-class":
        data = _write_folder(tmp_path / "odd", _pixels(3, 13), [0, 1, 2])
        (data / "airplane").rename(data / "zebra")
    elif case == "same-out":
        extra = ["--out", model]
    elif case == "resume-nothing":
        extra = ["--resume"]
    elif case == "bad-params":
        extra = ["--params", "nothing.*"]
    elif case == "no-data":
        data = tmp_path / "missing"
    elif case == "no-statistics":  # --unlabelled aligns to the training statistics by default
        proto = onnx.load(str(model))
        kept = [p for p in proto.metadata_props if p.key != "source_statistics"]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        onnx.save(proto, tmp_path / "bare.onnx")
        model, extra = tmp_path / "bare.onnx", ["--unlabelled"]
    out = extra[1] if extra[:1] == ["--out"] else tmp_path / "o.onnx"
    args = [
        "adapt",
        model,
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "2",
        "--quiet",
        *[a for a in extra if a != "--out" and a != out],
    ]
    result = _cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and last.startswith("subgrad adapt: error:"), result.stderr


def test_adapt_imports_no_torch(exports, folder, tmp_path):
    code = (
        "import sys\n"
        "from subgrad.export.adapt_run import adapt_file\n"
        "from subgrad.export.adapt import AdaptSettings\n"
        "import subgrad.export.corrupt\n"
        f"adapt_file({str(exports['lenet'])!r}, {str(folder)!r}, {str(tmp_path / 'o.onnx')!r}, steps=2, batch_size=8,"
        " progress=False, settings=AdaptSettings(objective='foa'), unlabelled=True)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"adapting imported torch: {result.stdout}"


def test_corruptions_are_deterministic_and_shift_the_images():
    from subgrad.export.corrupt import CORRUPTIONS, corrupt

    images = _pixels(5, 14)
    for name in CORRUPTIONS:
        a, b = corrupt(images, name, 5, seed=1), corrupt(images, name, 5, seed=1)
        assert a.dtype == np.uint8 and a.shape == images.shape and np.array_equal(a, b), name
        mild = np.abs(corrupt(images, name, 1, seed=1).astype(int) - images).mean()
        strong = np.abs(a.astype(int) - images).mean()
        assert 0 < mild < strong, f"{name}: severity 1 moves pixels by {mild}, severity 5 by {strong}"
    subset = corrupt(images[[1, 3]], "gaussian_noise", 5, seed=1, indices=[1, 3])
    assert np.array_equal(subset, corrupt(images, "gaussian_noise", 5, seed=1)[[1, 3]])
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog")
