"""Export, validation, benchmark, quantization, deploy runtime, Triton packaging and `subgrad run`.

Models are lenet and resnet20 trained for a few steps on the real archive (session fixtures), so the
exported graphs carry real, non-random weights.  Tolerances: fp32 logits PyTorch vs onnxruntime
<= 1e-4 (the issue's gate; measured ~1e-6), preprocessing-in-graph vs numpy <= 1e-6.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from conftest import real_archive
from subgrad.export.exporter import ExportError, WithPreprocessing, export_module, export_run
from subgrad.export.runtime import ImageError, ModelFileError, ModelInfo, Predictor, load_image, normalize

pytestmark = pytest.mark.slow  # every test here trains, exports and validates real models

MODELS = ["lenet", "resnet20", "localnet"]


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "subgrad", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=900
    )


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """{model: run folder} of short real-data training runs (lenet: 60 SGD steps, resnet20: 10 at lr 0.02,
    gentle enough that its eval-mode logits stay in a trained model's range, |logit| < 100; localnet: 20
    forward-only steps, whose training-only heads must stay out of model.pt and the ONNX file)."""
    from subgrad.training.config import TrainConfig
    from subgrad.training.loop import train

    archive = real_archive()
    out = {}
    for name, optimizer, steps, batch, lr in (
        ("lenet", "sgd", 60, 128, None),
        ("resnet20", "sgd", 10, 64, 0.02),
        ("localnet", "zo", 20, 64, None),
    ):
        folder = tmp_path_factory.mktemp(f"run-{name}")
        train(
            TrainConfig(
                model=name,
                optimizer=optimizer,
                data=str(archive),
                out=str(folder),
                device="cpu",
                steps=steps,
                batch_size=batch,
                lr=lr,
                quiet=True,
            )
        )
        out[name] = folder
    return out


@pytest.fixture(scope="session")
def exported(runs):
    """{model: (plain .onnx, --with-preprocessing .onnx)}."""
    return {
        name: (export_run(run, run / "model.onnx"), export_run(run, run / "model-pre.onnx", with_preprocessing=True))
        for name, run in runs.items()
    }


@pytest.fixture(scope="session")
def test_pixels():
    from subgrad.data import load_cifar10

    data = load_cifar10(real_archive())
    return data.test_images[:140], data.test_labels[:140]


@pytest.mark.parametrize("name", MODELS)
def test_export_is_checked_dynamic_and_self_describing(name, runs, exported):
    path, _ = exported[name]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 18 or any(o.domain == "" and o.version >= 18 for o in proto.opset_import)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value, f"batch dimension is fixed: {dims[0]}"
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    record = json.loads((runs[name] / "config.json").read_text())
    summary = json.loads((runs[name] / "summary.json").read_text())
    info = ModelInfo.from_props({p.key: p.value for p in proto.metadata_props}, str(path))
    assert info.class_names == record["classes"] and info.model_name == name
    assert info.mean == record["mean"] and info.std == record["std"]
    assert (info.height, info.width, info.input_layout, info.preprocessing_in_graph) == (32, 32, "NCHW", False)
    assert info.raw["training"]["test_accuracy"] == summary["test_accuracy"]
    assert info.raw["training"]["optimizer"] == record["optimizer"] == ("zo" if name == "localnet" else "sgd")
    assert {"torch", "onnx", "subgrad"} <= set(info.raw["versions"])


@pytest.mark.parametrize("name", MODELS)
def test_validate_dynamic_batches_equal_pytorch(name, runs, exported):
    """Batch 1, 2, 7, 64 over 140 images (a partial last batch at each size) and the report files."""
    from subgrad.export.validate import validate

    path, _ = exported[name]
    report = validate(path, runs[name], real_archive(), batch_sizes=(1, 2, 7, 64), limit=140)
    for row in report["per_batch_size"]:
        assert row["agreement"] == 1.0 and row["max_abs_diff"] <= 1e-4, row
    assert report["passed"] and not report["failures"]
    saved = json.loads((path.parent / "validation.json").read_text())
    assert saved["agreement"] == report["agreement"] and saved["max_abs_diff"] == report["max_abs_diff"]
    assert "PASSED" in (path.parent / "validation.md").read_text()


def test_validate_gate_fails_when_threshold_impossible(runs, exported):
    path, _ = exported["lenet"]
    out = _cli(
        "validate",
        path,
        "--run",
        runs["lenet"],
        "--data",
        real_archive(),
        "--batch-sizes",
        "7",
        "--limit",
        "70",
        "--max-abs-diff",
        "1e-12",
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED: max |logit difference|" in out.stderr
    saved = json.loads((path.parent / "validation.json").read_text())
    assert saved["passed"] is False and saved["failures"]


@pytest.mark.parametrize("name", MODELS)
def test_preprocessing_in_graph_equals_python(name, exported, test_pixels):
    plain, pre = exported[name]
    pixels, _ = test_pixels
    a, b = Predictor(plain), Predictor(pre)
    assert b.info.preprocessing_in_graph and b.info.input_layout == "NHWC"
    diff = np.abs(a.logits_from_pixels(pixels) - b.logits_from_pixels(pixels)).max()
    assert diff <= 1e-6, f"logits with in-graph preprocessing differ by {diff}"


def test_preprocessing_graph_alone_matches_numpy(tmp_path, test_pixels):
    """The normalisation ops by themselves (identity model): float32 results within 1e-6."""
    import onnxruntime as ort

    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    path = export_module(
        WithPreprocessing(nn.Identity(), mean, std),
        tmp_path / "pre.onnx",
        example=torch.zeros(2, 32, 32, 3, dtype=torch.uint8),
        name="preprocessing",
    )
    pixels, _ = test_pixels
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": pixels})[0]
    want = normalize(pixels, mean, std)
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-6, np.abs(got - want).max()


def test_predictor_takes_paths_pil_and_arrays(tmp_path, exported, test_pixels):
    from PIL import Image

    pixels, _ = test_pixels
    predictor = Predictor(exported["lenet"][0], batch_size=3)
    Image.fromarray(pixels[0]).save(tmp_path / "a.png")
    as_path, as_pil, as_array = predictor.predict([tmp_path / "a.png", Image.fromarray(pixels[0]), pixels[0]], top_k=3)
    assert as_path == as_pil == as_array and len(as_path) == 3
    probs = [p for _, p in as_path]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    # internal batching (3 per run) gives the same logits as one big run
    big = Predictor(exported["lenet"][0], batch_size=256)
    np.testing.assert_allclose(predictor.logits(list(pixels[:10])), big.logits(list(pixels[:10])), atol=1e-5)
    # a larger image is resized, a grey image is expanded to RGB
    assert len(predictor.predict(Image.fromarray(pixels[0]).resize((64, 64)), top_k=1)[0]) == 1
    assert len(predictor.predict([pixels[0][:, :, 0]])[0]) == 5
    with pytest.raises(ImageError, match="uint8"):
        predictor.predict([pixels[0].astype(np.float32)])
    with pytest.raises(ImageError, match="unreadable image"):
        load_image(tmp_path / "missing.png")


def _black_png(width: int, height: int) -> bytes:
    """A grayscale PNG of black pixels, written chunk by chunk (a large one is a decompression bomb)."""
    import zlib

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    pixels = zlib.compress(bytes(width + 1) * height, 9)
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(4096, 4096), (4097, 4096), (5000, 5000), (100, 400_000)])
def test_load_image_refuses_images_over_its_pixel_limit_before_decoding(width, height, monkeypatch):
    from PIL import ImageFile

    from subgrad.export.runtime import MAX_IMAGE_PIXELS

    encoded = _black_png(width, height)
    if width * height <= MAX_IMAGE_PIXELS:
        assert load_image(encoded).shape == (32, 32, 3)
        return
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("a refused image was decoded"))
    with pytest.raises(ImageError, match=f"{width} x {height} image, over the limit of {MAX_IMAGE_PIXELS:,}"):
        load_image(encoded)


@pytest.mark.parametrize("name", MODELS)
def test_predictor_agrees_with_pytorch_top1(name, runs, exported, test_pixels):
    from subgrad.export.exporter import load_run
    from subgrad.export.validate import torch_logits

    pixels, _ = test_pixels
    model, record, _ = load_run(runs[name])
    want = torch_logits(model, pixels, record["mean"], record["std"], 64).argmax(1)
    got = Predictor(exported[name][0]).predict(list(pixels), top_k=1)
    classes = record["classes"]
    assert [classes.index(top[0][0]) for top in got] == want.tolist()


def test_runtime_does_not_import_torch(exported, tmp_path):
    code = (
        "import sys; from subgrad.export.runtime import Predictor; "
        f"p = Predictor({str(exported['lenet'][0])!r}); import numpy as np; "
        "print(p.predict([np.zeros((32, 32, 3), np.uint8)], top_k=1)[0][0][0]); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    label, modules = out.stdout.strip().splitlines()
    assert label in json.loads((exported["lenet"][0].parent / "config.json").read_text())["classes"]
    assert modules == "[]", f"importing the runtime pulled in torch: {modules}"


def test_predict_cli_reports_bad_images_and_continues(tmp_path, exported, test_pixels):
    from PIL import Image

    pixels, _ = test_pixels
    good = [tmp_path / "0.png", tmp_path / "1.jpg"]
    Image.fromarray(pixels[0]).save(good[0]), Image.fromarray(pixels[1]).save(good[1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = _cli("predict", exported["lenet"][0], good[0], bad, good[1], "--top-k", "2")
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [str(good[0]), str(good[1])]
    assert all(ln.count(",") == 1 for ln in lines)  # --top-k 2: two "label p" pairs per line
    assert f"{bad}: unreadable image" in out.stderr and "1 of 3 images failed" in out.stderr
    assert _cli("predict", exported["lenet"][0], good[0]).returncode == 0


@pytest.mark.parametrize("name", MODELS)
def test_bench_reports_both_sides(name, runs, exported, tmp_path):
    # lenet, localnet: eager weights rebuilt from the ONNX file; resnet20 (BatchNorm folded by the exporter): --run
    extra = ("--run", runs[name]) if name == "resnet20" else ()
    out = _cli(
        "bench",
        exported[name][0],
        "--runs",
        "3",
        "--warmup",
        "1",
        "--batch-sizes",
        "1,4",
        "--json",
        tmp_path / "b.json",
        *extra,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    (cpu,) = [r for r in report["results"] if r["provider"] == "CPUExecutionProvider"]
    assert report["torch_weights"] == (f"run {runs[name]}" if name == "resnet20" else "onnx") and report["threads"] >= 1
    assert cpu["provider_used"] == "CPUExecutionProvider" and cpu["session_create_ms"] > 0
    for bs in ("1", "4"):
        row = cpu["batches"][bs]
        for side in ("torch", "onnxruntime"):
            assert row[side]["runs"] == 3 and 0 < row[side]["p50_ms"] <= row[side]["p99_ms"], row
        assert row["p50_speedup"] > 0 and row["throughput_ratio"] > 0
    assert "CPUExecutionProvider" in out.stdout


@pytest.mark.parametrize("name", MODELS)
def test_quantize_int8_and_accuracy_gate(name, runs, exported, tmp_path):
    from subgrad.export.quantize import quantize

    src = exported[name][0]
    # The gate at the bound this test states for the drop (5 points), not the CLI's default 1 point: these
    # 60-step models are near chance (15-30% by CPU), where 300 images resolve 0.33 points and int8 flips
    # a few low-margin predictions (1.33 points on an AMD EPYC VM). The gate itself is checked below.
    report = quantize(src, real_archive(), tmp_path / "q.onnx", calibration_images=128, limit=300, max_drop=5.0)
    assert report["written"] and (tmp_path / "q.onnx").is_file(), report["reason"]
    assert report["size_ratio"] < 0.5, report  # int8 weights: about a quarter of fp32 plus QDQ scales
    assert report["accuracy_quantized"] is not None and report["speedup_batch256"] > 0
    if name == "lenet":  # (the 10-step resnet20 is near chance: its int8 accuracy says little)
        assert abs(report["accuracy_drop_points"]) <= 5, report
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    info = Predictor(tmp_path / "q.onnx").info  # metadata survives quantization
    assert info.model_name == name and info.raw["quantization"]["per_channel"] is True
    if name != "lenet":
        return
    # an impossible gate (accuracy must rise 100 points): refused, exit 1, nothing written
    out = _cli(
        "quantize",
        src,
        "--data",
        real_archive(),
        "--out",
        tmp_path / "refused.onnx",
        "--limit",
        "200",
        "--calibration-images",
        "64",
        "--max-drop",
        "-100",
    )
    assert out.returncode == 1 and "refused" in out.stderr and not (tmp_path / "refused.onnx").exists()
    assert json.loads((tmp_path / "quantization-int8.json").read_text())["written"] is False


def test_fp16_conversion_keeps_float_io(exported, tmp_path):
    from subgrad.export.quantize import quantize

    report = quantize(exported["lenet"][0], real_archive(), tmp_path / "h.onnx", mode="fp16", limit=200)
    assert report["written"], report
    proto = onnx.load(str(tmp_path / "h.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)


def _triton_config_type():
    """The part of Triton's ModelConfig (model_config.proto) that `subgrad package` writes, as a real
    protobuf message type, so text_format parsing rejects unknown fields and enum names."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="subgrad_test_model_config.proto", package="inference", syntax="proto3"
    )
    dt = fdp.enum_type.add(name="DataType")
    for i, n in enumerate(
        [
            "TYPE_INVALID",
            "TYPE_BOOL",
            "TYPE_UINT8",
            "TYPE_UINT16",
            "TYPE_UINT32",
            "TYPE_UINT64",
            "TYPE_INT8",
            "TYPE_INT16",
            "TYPE_INT32",
            "TYPE_INT64",
            "TYPE_FP16",
            "TYPE_FP32",
            "TYPE_FP64",
            "TYPE_STRING",
            "TYPE_BF16",
        ]
    ):
        dt.value.add(name=n, number=i)

    def message(name, fields):
        msg = fdp.message_type.add(name=name)
        for number, (fname, ftype, label, type_name) in enumerate(fields, 1):
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = f".inference.{type_name}"
        return msg

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    kind = fdp.message_type.add(name="ModelInstanceGroup")
    kenum = kind.enum_type.add(name="Kind")
    for i, n in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kenum.value.add(name=n, number=i)
    kind.field.add(name="name", number=1, type=F.TYPE_STRING, label=one)
    kind.field.add(name="kind", number=4, type=F.TYPE_ENUM, label=one, type_name=".inference.ModelInstanceGroup.Kind")
    kind.field.add(name="count", number=2, type=F.TYPE_INT32, label=one)
    kind.field.add(name="gpus", number=3, type=F.TYPE_INT32, label=many)
    message(
        "ModelInput",
        [
            ("name", F.TYPE_STRING, one, None),
            ("data_type", F.TYPE_ENUM, one, "DataType"),
            ("dims", F.TYPE_INT64, many, None),
        ],
    )
    message(
        "ModelOutput",
        [
            ("name", F.TYPE_STRING, one, None),
            ("data_type", F.TYPE_ENUM, one, "DataType"),
            ("dims", F.TYPE_INT64, many, None),
            ("label_filename", F.TYPE_STRING, one, None),
        ],
    )
    message(
        "ModelDynamicBatching",
        [
            ("preferred_batch_size", F.TYPE_INT32, many, None),
            ("max_queue_delay_microseconds", F.TYPE_UINT64, one, None),
        ],
    )
    message(
        "ModelConfig",
        [
            ("name", F.TYPE_STRING, one, None),
            ("platform", F.TYPE_STRING, one, None),
            ("max_batch_size", F.TYPE_INT32, one, None),
            ("input", F.TYPE_MESSAGE, many, "ModelInput"),
            ("output", F.TYPE_MESSAGE, many, "ModelOutput"),
            ("instance_group", F.TYPE_MESSAGE, many, "ModelInstanceGroup"),
            ("dynamic_batching", F.TYPE_MESSAGE, one, "ModelDynamicBatching"),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


@pytest.mark.parametrize("name, which", [("lenet", "plain"), ("lenet", "preprocessing"), ("resnet20", "plain")])
def test_package_writes_a_triton_repository_matching_the_model(name, which, exported, tmp_path):
    from google.protobuf import text_format

    src = exported[name][0 if which == "plain" else 1]
    out = _cli("package", src, "--triton-repo", tmp_path / "repo", "--name", "cifar10_model", "--max-batch-size", "128")
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "repo" / "cifar10_model"
    config = text_format.Parse((folder / "config.pbtxt").read_text(), _triton_config_type()())
    proto = onnx.load(str(folder / "1" / "model.onnx"))
    assert config.name == "cifar10_model" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 128
    assert config.dynamic_batching.max_queue_delay_microseconds == 0  # package_triton's default
    assert max(config.dynamic_batching.preferred_batch_size) <= 128
    assert config.instance_group[0].count >= 1
    types = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.UINT8: "TYPE_UINT8"}
    dtype_name = _triton_config_type().DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number
    for entries, values in ((config.input, proto.graph.input), (config.output, proto.graph.output)):
        assert [e.name for e in entries] == [v.name for v in values]
        for e, v in zip(entries, values):
            shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
            assert list(e.dims) == shape[1:], (e.dims, shape)  # batch dimension implicit
            assert dtype_name[e.data_type].name == types[v.type.tensor_type.elem_type]
    assert config.output[0].label_filename == "labels.txt"
    labels = (folder / "labels.txt").read_text().splitlines()
    assert labels == Predictor(src).class_names and len(labels) == config.output[0].dims[0]


def test_bad_files_get_one_line_errors(tmp_path, exported, runs):
    from subgrad.export.triton_repo import package_triton

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported["lenet"][0].read_bytes()[:1000])
    bare = tmp_path / "bare.onnx"  # valid ONNX without subgrad metadata
    proto = onnx.load(str(exported["lenet"][0]))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    for bad in (junk, truncated, tmp_path / "missing.onnx"):
        with pytest.raises(ModelFileError):
            Predictor(bad)
        with pytest.raises(ModelFileError):
            package_triton(bad, tmp_path / "repo")
    with pytest.raises(ModelFileError, match="no subgrad metadata"):
        Predictor(bare)
    for args in (
        ("predict", junk, "x.png"),
        ("bench", truncated),
        ("validate", bare, "--run", runs["lenet"], "--data", real_archive()),
    ):
        out = _cli(*args)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3072, 10)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return y if y.sum() > 0 else -y


class _NoOnnxOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3072, 10)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return y + torch.linalg.eigvals(y.T @ y).real.sum()


def test_unsupported_models_get_a_one_line_reason(tmp_path, runs):
    with pytest.raises(ExportError, match="no ONNX translation for the op aten.linalg_eig") as info:
        export_module(_NoOnnxOp(), tmp_path / "a.onnx")
    assert "\n" not in str(info.value)
    with pytest.raises(ExportError, match="cannot export _DataDependent") as info:
        export_module(_DataDependent(), tmp_path / "b.onnx")
    assert "\n" not in str(info.value) and "data-dependent" in str(info.value)
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()
    with pytest.raises(ExportError, match="batch of at least 2"):
        export_module(nn.Identity(), tmp_path / "c.onnx", example=torch.zeros(1, 3, 32, 32))
    # a run folder whose model is not in the registry
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    record = json.loads((runs["lenet"] / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps(dict(record, model="vgg11")))
    (foreign / "model.pt").write_bytes((runs["lenet"] / "model.pt").read_bytes())
    out = _cli("export", foreign, "--out", tmp_path / "d.onnx")
    assert out.returncode == 2 and "expected one of lenet" in out.stderr and len(out.stderr.splitlines()) == 1
    # a run folder that names code: never imported because a file names it
    (foreign / "config.json").write_text(json.dumps(dict(record, model="os:system")))
    out = _cli("export", foreign, "--out", tmp_path / "d.onnx")
    assert out.returncode == 2 and "--code os:system" in out.stderr and len(out.stderr.splitlines()) == 1


def test_run_command_trains_exports_validates_and_reports(tmp_path):
    out = _cli(
        "run",
        "--data",
        real_archive(),
        "--out",
        tmp_path / "main",
        "--device",
        "cpu",
        "--steps",
        "40",
        "--bench-runs",
        "3",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # stderr is a pipe, not a terminal: readable lines only, no progress-bar redraws
    assert "\r" not in out.stderr and len(out.stderr) < 30_000, out.stderr[:2000]
    assert "step      40  epoch   0.10" in out.stderr and "passed: top-1 agreement" in out.stderr, out.stderr
    assert out.stdout.strip() == f"report: {tmp_path / 'main' / 'report.md'}", out.stdout
    run = tmp_path / "main"
    for name in (
        "model.onnx",
        "validation.json",
        "validation.md",
        "bench.json",
        "report.md",
        "curves.png",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    validation = json.loads((run / "validation.json").read_text())
    assert validation["images"] == 10000 and validation["passed"]
    assert [r["batch_size"] for r in validation["per_batch_size"]] == [1, 2, 7, 64, 256]
    report = (run / "report.md").read_text()
    assert "PASSED" in report and "curves.png" in report and "CPUExecutionProvider" in report


def test_run_command_without_data_names_the_flag(tmp_path):
    not_data = tmp_path / "notes.txt"
    not_data.write_text("hello")
    out = _cli("run", "--data", not_data, "--out", tmp_path / "x", "--quiet")
    assert out.returncode == 2 and "--data" in out.stderr and "expected" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
