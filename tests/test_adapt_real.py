"""``subgrad adapt`` and ``subgrad corrupt`` on the real archive: a LeNet trained 60 steps (conftest's
``served_lenet_onnx``), its export's recorded training statistics against torch's own activations, and
adaptation that lowers the loss on shifted images.  Slow tier (reads the real archive).

Tolerances: recorded statistics against torch's (float64 numpy over the same images) <= 1e-3 relative
(onnxruntime and torch convolve in different orders; the values are rounded to 6 decimals).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import real_archive

pytestmark = pytest.mark.slow


def _corrupt(out, *extra) -> None:
    """``subgrad corrupt`` on 400 real test images, as a user runs it."""
    command = ["corrupt", "--data", real_archive(), "--out", out, "--limit", "400", *extra]
    result = subprocess.run(
        [sys.executable, "-m", "subgrad", *map(str, command)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenario")
    _corrupt(out)
    return out


def test_the_scenario_is_deterministic_and_split_in_halves(scenario, tmp_path):
    again = tmp_path / "again"
    _corrupt(again, "--corruptions", "gaussian_noise")
    first = sorted(p.relative_to(scenario) for p in (scenario / "gaussian_noise").rglob("*.png"))
    second = sorted(p.relative_to(again) for p in (again / "gaussian_noise").rglob("*.png"))
    assert first == second and len(first) == 400
    assert all((scenario / p).read_bytes() == (again / p).read_bytes() for p in first)
    adapt = {p.name for p in (scenario / "clean" / "adapt").rglob("*.png")}
    held = {p.name for p in (scenario / "clean" / "eval").rglob("*.png")}
    assert len(adapt) == len(held) == 200 and not adapt & held
    assert len({p.parent.name for p in (scenario / "clean" / "eval").rglob("*.png")}) == 10, "a half misses classes"


def test_export_records_the_layers_statistics_on_the_training_data(served_lenet_onnx):
    from subgrad.data import load_cifar10
    from subgrad.export import source_stats
    from subgrad.export.runtime import Predictor
    from subgrad.models import build_model
    from subgrad.run_folder import load_checkpoint

    meta = {p.key: p.value for p in onnx.load(str(served_lenet_onnx)).metadata_props}
    recorded = json.loads(meta[source_stats.KEY])
    model = build_model("lenet")
    model.load_state_dict(load_checkpoint(served_lenet_onnx.parent / "model.pt")["model"])
    outputs = {}
    for name in ("conv1", "conv2", "fc1", "fc2"):
        getattr(model, name).register_forward_hook(lambda m, i, o, n=name: outputs.__setitem__(n, o.double()))
    info = Predictor(served_lenet_onnx).info
    images = source_stats.subset(load_cifar10(real_archive()).train_images)
    with torch.no_grad():
        model.eval()(torch.from_numpy(info.prepare(images)))
    assert len(recorded) == 4
    for stats, name in zip(recorded, ("conv1", "conv2", "fc1", "fc2")):
        axes = (0, 2, 3) if outputs[name].ndim == 4 else (0,)
        mean, var = outputs[name].mean(axes).numpy(), outputs[name].var(axes, unbiased=False).numpy()
        for what, ours, theirs in (("mean", stats["mean"], mean), ("var", stats["var"], var)):
            err = np.abs(np.asarray(ours) - theirs).max() / max(np.abs(theirs).max(), 1e-6)
            assert err <= 1e-3, f"{name} {what}: recorded vs torch differ by {err:.2e} of the largest"


@pytest.mark.parametrize("params", ["affine", "head"])
def test_labelled_adaptation_lowers_the_loss_on_shifted_images(served_lenet_onnx, scenario, params):
    from subgrad.export.adapt import Adapter
    from subgrad.export.adapt_data import batch_indices, load_adapt_data

    adapter = Adapter(served_lenet_onnx, params=params, lr=3e-3, threads=1)
    data = load_adapt_data(scenario / "gaussian_noise", adapter.info.class_names, (32, 32), True)
    before = adapter.objective(data.adapt.pixels, data.adapt.labels)
    for step in range(60):
        index = batch_indices(len(data.adapt), 64, 0, step)
        adapter.step(data.adapt.pixels[index], data.adapt.labels[index])
    after = adapter.objective(data.adapt.pixels, data.adapt.labels)
    assert after < before - 0.02, f"{params}: cross-entropy on the adaptation images {before:.4f} -> {after:.4f}"


def test_triton_serves_the_adapted_model(served_lenet_onnx, scenario, tmp_path):
    """The adapted file through a real Triton Inference Server (python backend) and tritonclient: the
    served logits equal Predictor's on the adapted file, bit for bit (same onnxruntime, same options)."""
    import tritonclient.http as httpclient
    from PIL import Image

    from subgrad.export.adapt_run import adapt_file
    from subgrad.export.runtime import Predictor
    from subgrad.export.serve import TritonServer, free_port
    from subgrad.export.triton_repo import package_triton

    out = tmp_path / "adapted.onnx"
    adapt_file(served_lenet_onnx, scenario / "gaussian_noise", out, steps=10, batch_size=32, threads=1, progress=False)
    expected_model = Predictor(out)
    pixels = np.stack(
        [
            np.asarray(Image.open(p).convert("RGB"))
            for p in sorted((scenario / "gaussian_noise" / "eval").rglob("*.png"))[:8]
        ]
    )
    x = expected_model.preprocess(pixels)
    repo = tmp_path / "repo"
    package_triton(out, repo, backend="python", max_batch_size=8)
    with TritonServer(repo, free_port(), free_port(), free_port(), log_path=tmp_path / "server.log") as server:
        client = httpclient.InferenceServerClient(f"localhost:{server.http_port}")
        meta = client.get_model_metadata("adapted")
        item = httpclient.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
        item.set_data_from_numpy(x)
        served = client.infer("adapted", [item]).as_numpy(meta["outputs"][0]["name"])
    expected = expected_model.logits_from_pixels(pixels)
    assert np.array_equal(served, expected), f"served logits differ by {np.abs(served - expected).max()}"
    assert not np.array_equal(expected, Predictor(served_lenet_onnx).logits_from_pixels(pixels)), "nothing was adapted"
