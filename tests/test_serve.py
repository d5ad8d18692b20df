"""A real Triton Inference Server (the serve extra's, python backend) with real clients (tritonclient).

One server for the module (a LeNet trained 60 steps on the real archive, packaged with max batch 16);
`subgrad serve` itself runs as a subprocess where its own behaviour is tested (endpoints, SIGTERM,
a killed stub, one-line errors).  Bound for served outputs: bit for bit equal to ``Predictor`` (the
model runs in the same onnxruntime with the same session options; each image's logits do not depend
on the batch it rides in).  Slow tier (conftest: SLOW_MODULES).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from conftest import real_archive
from subgrad.export.runtime import Predictor
from subgrad.export.serve import TritonServer, free_port
from subgrad.export.triton_python_model import IMAGE_INPUT
from subgrad.export.triton_repo import package_triton

pytestmark = pytest.mark.slow  # every test here starts a real Triton Inference Server

MAX_BATCH = 16
MODEL = "lenet"


@pytest.fixture(scope="module")
def model_file(served_lenet_onnx):
    return served_lenet_onnx


@pytest.fixture(scope="module")
def images():
    """32 real CIFAR-10 test images: uint8 pixels, and the same images as PNG and JPEG files."""
    from subgrad.data import load_cifar10

    pixels = load_cifar10(real_archive()).test_images[:32]

    def encode(fmt):
        out = []
        for im in pixels:
            buffer = io.BytesIO()
            Image.fromarray(im).save(buffer, format=fmt)
            out.append(buffer.getvalue())
        return out

    return {"pixels": pixels, "PNG": encode("PNG"), "JPEG": encode("JPEG")}


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    package_triton(model_file, repo, backend="python", max_batch_size=MAX_BATCH)
    triton = TritonServer(repo, free_port(), free_port(), free_port(), log_path=repo.parent / "server.log")
    with triton:
        yield triton


@pytest.fixture(scope="module")
def predictor(model_file):
    return Predictor(model_file)


def _http(server):
    return httpclient.InferenceServerClient(f"localhost:{server.http_port}", concurrency=1)


def _grpc(server):
    return grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}")


def _tensor_input(module, name, array, binary=True):
    item = module.InferInput(
        name,
        list(array.shape),
        "BYTES"
        if array.dtype == object
        else {np.float32: "FP32", np.uint8: "UINT8", np.int32: "INT32"}[array.dtype.type],
    )
    if module is httpclient:
        item.set_data_from_numpy(array, binary_data=binary)
    else:
        item.set_data_from_numpy(array)
    return item


def _assert_equal(served, expected, what):
    assert served.shape == expected.shape, (what, served.shape, expected.shape)
    diff = np.abs(served.astype(np.float64) - expected).max()
    assert np.array_equal(served, expected), f"{what}: served logits differ from Predictor's by up to {diff:.3g}"


def _post(port, body: bytes, headers=None, timeout=60):
    request = urllib.request.Request(
        f"http://localhost:{port}/v2/models/{MODEL}/infer", data=body, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _run_clients(client_loop, count):
    """``client_loop(worker)`` in ``count`` threads at once (each makes its own client), until all return."""
    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _check_still_serving(server, predictor, images):
    feed = predictor.preprocess(images["pixels"][:2])
    out = _http(server).infer(MODEL, [_tensor_input(httpclient, "input", feed)]).as_numpy("logits")
    _assert_equal(out, predictor.logits_from_pixels(images["pixels"][:2]), "the valid request after a bad one")


# -- health, metadata, answers ----------------------------------------------------------------------------


def test_live_ready_and_metadata_match_the_onnx_graph(server, model_file):
    graph = onnx.load(str(model_file)).graph
    types = {onnx.TensorProto.FLOAT: "FP32"}
    for client in (_http(server), _grpc(server)):
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        meta = client.get_model_metadata(
            MODEL, **({"as_json": True} if isinstance(client, grpcclient.InferenceServerClient) else {})
        )
        inputs = {i["name"]: (i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]}
        outputs = {o["name"]: (o["datatype"], [int(d) for d in o["shape"]]) for o in meta["outputs"]}
        for value, table in ((graph.input[0], inputs), (graph.output[0], outputs)):
            dims = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
            assert table[value.name] == (types[value.type.tensor_type.elem_type], dims), (value.name, table)
        assert inputs[IMAGE_INPUT] == ("BYTES", [-1, 1])
        assert len(inputs) == 2 and len(outputs) == 1


@pytest.mark.parametrize("protocol", ["http-binary", "http-json", "grpc"])
def test_tensor_inference_equals_predictor(server, predictor, images, protocol):
    pixels = images["pixels"][:MAX_BATCH]
    feed = predictor.preprocess(pixels)
    module = grpcclient if protocol == "grpc" else httpclient
    client = _grpc(server) if protocol == "grpc" else _http(server)
    result = client.infer(MODEL, [_tensor_input(module, "input", feed, binary=protocol != "http-json")])
    _assert_equal(result.as_numpy("logits"), predictor.logits_from_pixels(pixels), protocol)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_image_files_equal_predictor_on_the_same_files(server, predictor, images, fmt, module):
    files = images[fmt][:8]
    client = _grpc(server) if module is grpcclient else _http(server)
    encoded = np.array(files, dtype=object).reshape(-1, 1)
    result = client.infer(MODEL, [_tensor_input(module, IMAGE_INPUT, encoded)])
    _assert_equal(result.as_numpy("logits"), predictor.logits(files), f"{fmt} over {module.__name__}")


def test_top_k_labels_through_the_classification_extension(server, predictor, images):
    files = images["PNG"][:4]
    output = httpclient.InferRequestedOutput("logits", class_count=3)
    result = _http(server).infer(
        MODEL, [_tensor_input(httpclient, IMAGE_INPUT, np.array(files, dtype=object).reshape(-1, 1))], outputs=[output]
    )
    served = [[entry.decode().split(":")[2] for entry in row] for row in result.as_numpy("logits")]
    assert served == [[label for label, _ in row] for row in predictor.predict(files, top_k=3)]


def test_concurrent_clients_are_batched(server, predictor, images):
    pixels = images["pixels"]
    expected = predictor.logits_from_pixels(pixels)
    failures = []

    def client_loop(worker):
        client = _http(server)
        for i in range(12):
            k = (worker * 12 + i) % len(pixels)
            out = client.infer(MODEL, [_tensor_input(httpclient, "input", predictor.preprocess(pixels[k : k + 1]))])
            if not np.array_equal(out.as_numpy("logits"), expected[k : k + 1]):
                failures.append(k)

    _run_clients(client_loop, 16)
    assert not failures, f"{len(failures)} concurrent answers differ from Predictor's"
    stats = _http(server).get_inference_statistics(MODEL)["model_stats"][0]["batch_stats"]
    sizes = {int(entry["batch_size"]): int(entry["compute_infer"]["count"]) for entry in stats}
    assert max(sizes) > 1, f"no execution batched more than one request: {sizes}"


# -- bad requests -----------------------------------------------------------------------------------------


def _binary_request(name, array, datatype):
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": array.nbytes},
                }
            ]
        }
    ).encode()
    return header + array.tobytes(), {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def _longer_than_declared(one):
    body, headers = _binary_request("input", one, "FP32")
    return body + bytes(3 << 20), headers


_CORRUPT_IMAGE_JSON = json.dumps(
    {"inputs": [{"name": IMAGE_INPUT, "shape": [1, 1], "datatype": "BYTES", "data": ["not an image"]}]}
).encode()
#: case -> (request (body, headers) from a feed of two model inputs, what the error message must say); built
#: only for the case a test runs (the 64 MB one is not made at collection or for the other cases)
BAD_HTTP_REQUESTS = {
    "wrong input name": (
        lambda feed: _binary_request("pixels", feed[:1], "FP32"),
        "unexpected inference input 'pixels'",
    ),
    "wrong dtype": (lambda feed: _binary_request("input", feed[:1].astype(np.int32), "INT32"), "data-type is 'INT32'"),
    "wrong shape": (lambda feed: _binary_request("input", feed[:1, :, :16], "FP32"), "unexpected shape"),
    "batch above max_batch_size": (
        lambda feed: _binary_request("input", np.repeat(feed[:1], MAX_BATCH + 1, 0), "FP32"),
        f"max_batch_size {MAX_BATCH}",
    ),
    "empty batch": (lambda feed: _binary_request("input", feed[:0], "FP32"), "input"),
    "corrupt image bytes": (lambda feed: (_CORRUPT_IMAGE_JSON, {}), "unreadable image"),
    "64 MB body": (
        lambda feed: _binary_request("input", np.zeros((64 << 20) // 4, np.float32).reshape(-1, 4), "FP32"),
        "over the server's limit",
    ),
    "4 MB of JSON": (lambda feed: (b'{"inputs": [' + b" " * (4 << 20) + b"]}", {}), "send binary tensors"),
    "body longer than its header says": (lambda feed: _longer_than_declared(feed[:1]), "inputs declare"),
}


@pytest.mark.parametrize("case", list(BAD_HTTP_REQUESTS))
def test_bad_http_request_gets_a_4xx_and_the_server_keeps_answering(server, predictor, images, case):
    feed = predictor.preprocess(images["pixels"][:2])
    build, message = BAD_HTTP_REQUESTS[case]
    body, headers = build(feed)
    status, answer = _post(server.http_port, body, headers)
    assert 400 <= status < 500, (case, status, answer[:300])
    error = json.loads(answer)["error"]
    assert message in error, (case, error)
    assert server.exit_status() is None, f"{case}: the server exited; its log: {server.log_path}"
    _check_still_serving(server, predictor, images)


@pytest.mark.parametrize(
    "case",
    [
        "wrong input name",
        "wrong dtype",
        "wrong shape",
        "batch above max_batch_size",
        "corrupt image bytes",
        "64 MB message",
    ],
)
def test_bad_grpc_request_gets_invalid_argument(server, predictor, images, case):
    feed = predictor.preprocess(images["pixels"][:1])
    inputs = {
        "wrong input name": ("pixels", feed),
        "wrong dtype": ("input", feed.astype(np.int32)),
        "wrong shape": ("input", feed[:, :, :16]),
        "batch above max_batch_size": ("input", np.repeat(feed, MAX_BATCH + 1, 0)),
        "corrupt image bytes": (IMAGE_INPUT, np.array([b"\x89PNG broken"], dtype=object).reshape(1, 1)),
        "64 MB message": ("input", np.zeros(((64 << 20) // feed.nbytes, 3, 32, 32), np.float32)),
    }
    name, array = inputs[case]
    client = grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}")
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [_tensor_input(grpcclient, name, array)], client_timeout=60)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", (case, caught.value)
    assert server.exit_status() is None
    _check_still_serving(server, predictor, images)


# -- `subgrad serve` itself -------------------------------------------------------------------------------


def _serve(*args, **popen):
    return subprocess.Popen(
        [sys.executable, "-m", "subgrad", "serve", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _wait_for_line(stream, needle, timeout_s=120):
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"no line with {needle!r} within {timeout_s} s; got {lines}")


def test_serve_prints_endpoints_recovers_a_killed_stub_and_stops_on_sigterm(model_file, predictor, images):
    ports = [free_port() for _ in range(3)]
    proc = _serve(
        model_file,
        "--http-port",
        ports[0],
        "--grpc-port",
        ports[1],
        "--metrics-port",
        ports[2],
        "--max-batch",
        MAX_BATCH,
    )
    try:
        out = "".join(_wait_for_line(proc.stdout, "Ctrl-C"))
        assert f"http://127.0.0.1:{ports[0]}/v2/models/{MODEL}/infer" in out and f"127.0.0.1:{ports[1]}" in out
        assert "to this machine only" in out and "closed to every client" in out
        client = httpclient.InferenceServerClient(f"localhost:{ports[0]}", network_timeout=30)
        feed = predictor.preprocess(images["pixels"][:1])
        expected = predictor.logits_from_pixels(images["pixels"][:1])
        _assert_equal(
            client.infer(MODEL, [_tensor_input(httpclient, "input", feed)]).as_numpy("logits"),
            expected,
            "before the kill",
        )
        stubs = subprocess.run(
            ["pgrep", "-P", str(_server_pid(proc.pid)), "-f", "triton_python_backend_stub"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert stubs, "no python-backend stub found"
        os.kill(int(stubs[0]), signal.SIGKILL)
        _wait_for_line(proc.stderr, "died")
        _wait_for_line(proc.stderr, "ready again")
        _assert_equal(
            client.infer(MODEL, [_tensor_input(httpclient, "input", feed)]).as_numpy("logits"),
            expected,
            "after the reload",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "stopped (server exit status 0)" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def _server_pid(serve_pid):
    children = subprocess.run(
        ["pgrep", "-P", str(serve_pid), "-f", "tritonserver"], capture_output=True, text=True
    ).stdout.split()
    assert children, "subgrad serve has no tritonserver child"
    return int(children[0])


def test_killed_stub_fails_requests_at_once_and_recover_reloads_it(server, predictor, images):
    """Without `subgrad serve` watching: the server answers an error at once, it does not hang."""
    stubs = [pid for pid in server._stub_pids()]
    os.kill(stubs[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(InferenceServerException, match="not healthy"):
        _http(server).infer(MODEL, [_tensor_input(httpclient, "input", predictor.preprocess(images["pixels"][:1]))])
    assert time.monotonic() - start < 10
    assert server.dead_stubs(), "the dead stub was not noticed"
    assert server.recover(MODEL)
    _check_still_serving(server, predictor, images)


def test_serve_errors_are_one_line(model_file, tmp_path):
    def one_line(proc, needle):
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        one_line(_serve(model_file, "--http-port", busy.getsockname()[1]), "is in use on 127.0.0.1; pass --http-port")
    onnx_repo = tmp_path / "onnx-repo"
    package_triton(model_file, onnx_repo)
    one_line(_serve(onnx_repo, "--http-port", free_port()), "package it with --backend python")
    one_line(_serve(onnx_repo, "--max-batch", 4), "apply when serving MODEL.onnx")
    one_line(_serve(model_file, "--restarts", -1), "--restarts must be 0 or more")
    weak = {**os.environ, "SUBGRAD_ADMIN_KEY": "short"}
    one_line(_serve(model_file, "--http-port", free_port(), env=weak), "SUBGRAD_ADMIN_KEY must be 16 to 256")
    broken = tmp_path / "broken-repo"
    folder = package_triton(model_file, broken, backend="python")
    (folder / "1" / "model.onnx").write_bytes(b"not onnx")
    one_line(
        _serve(
            broken,
            "--http-port",
            free_port(),
            "--grpc-port",
            free_port(),
            "--metrics-port",
            free_port(),
            "--log",
            tmp_path / "broken.log",
        ),
        "exited before it was ready",
    )
    assert (tmp_path / "broken.log").stat().st_size > 0


def test_soak_zero_failures_and_bounded_memory(server, predictor, images):
    """60 s at concurrency 16: every answer right, resident memory (server + stubs) grows < 64 MiB."""
    pixels = images["pixels"]
    expected = predictor.logits_from_pixels(pixels)
    warm = _http(server)
    for k in range(64):
        warm.infer(MODEL, [_tensor_input(httpclient, "input", predictor.preprocess(pixels[k % 32 : k % 32 + 1]))])
    before = server.resident_bytes()
    deadline, counts, failures = time.monotonic() + float(os.environ.get("SUBGRAD_SOAK_S", "60")), [], []

    def client_loop(worker):
        client, done = _http(server), 0
        while time.monotonic() < deadline:
            k = (worker + done) % len(pixels)
            try:
                out = client.infer(MODEL, [_tensor_input(httpclient, "input", predictor.preprocess(pixels[k : k + 1]))])
                if not np.array_equal(out.as_numpy("logits"), expected[k : k + 1]):
                    failures.append(f"wrong answer for image {k}")
            except Exception as exc:  # every failure counts, whatever it is
                failures.append(repr(exc)[:200])
            done += 1
        counts.append(done)

    _run_clients(client_loop, 16)
    growth = server.resident_bytes() - before
    print(
        f"soak: {sum(counts)} requests, {len(failures)} failures, resident memory {before / 2**20:.0f} MiB "
        f"-> +{growth / 2**20:.1f} MiB"
    )
    assert not failures, failures[:5]
    assert growth < 64 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB"
