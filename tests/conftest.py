"""Test setup: on a machine without CUDA, Triton kernels run in Triton's interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before ``subgrad.kernels`` is imported (``@triton.jit`` reads it at
decoration time), so it is set here, before any test module imports the package.  With CUDA, the
same tests compile the kernels for the GPU and compare them with the twins on the device.
"""

import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("SUBGRAD_BACKEND", None)  # tests choose backends explicitly
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # -n N: N workers share the cores; torch's default (every core in each worker) oversubscribes them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

#: Sizes from the issue: a single element, one short of / one past a 1024-wide block, and a big odd one,
#: which runs in the slow tier (the interpreter takes seconds per launch there).
SIZE_VALUES = (1, 1023, 1025, 70001)
SIZES = [n if n < 70001 else pytest.param(n, marks=pytest.mark.slow) for n in SIZE_VALUES]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pytest_collection_modifyitems(items):
    """Each test file declares its tier (``pytestmark = pytest.mark.slow``, or ``@pytest.mark.slow`` on a
    test); this refuses a test that reads the real archive but is not marked, so the edit loop
    (``pytest -m "not slow"``) never picks it up by accident."""
    for item in items:
        names = set(item.function.__code__.co_names) if hasattr(item, "function") else set()
        if {"real_archive", "cifar_subset"} & names and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} reads the real CIFAR-10 archive: mark it pytest.mark.slow")


@pytest.fixture
def device():
    return DEVICE


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal bit patterns (so -0.0 vs 0.0 and NaN payloads count), with a readable report if not."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.shape}/{actual.dtype} vs {expected.shape}/{expected.dtype}"
    )
    int_type = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a, e = actual.reshape(-1).view(int_type), expected.reshape(-1).view(int_type)
    bad = (a != e).nonzero().reshape(-1)
    if bad.numel():
        i = bad[:5].tolist()
        raise AssertionError(
            f"{what}: {bad.numel()} of {a.numel()} elements differ; first at {i}: "
            f"{actual.reshape(-1)[i].tolist()} vs {expected.reshape(-1)[i].tolist()}"
        )


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """One decoded-data cache per test session (the real archive is decoded once, not per test)."""
    os.environ["SUBGRAD_CACHE"] = str(tmp_path_factory.mktemp("subgrad-cache"))
    yield


def real_archive():
    """Path of the team's real CIFAR-10 archive, or skip the test with the reason."""
    from cifar_subset import ARCHIVE as path

    if not path.exists():
        pytest.skip(f"real CIFAR-10 archive not found at {path} (team data in ../shared/data)")
    return path


@pytest.fixture(scope="session")
def served_lenet_onnx(tmp_path_factory):
    """A LeNet trained 60 steps on the real archive and exported: the model the serving tests serve
    (test_serve.py, test_serve_attack.py), trained once per session."""
    from subgrad.export.exporter import export_run
    from subgrad.training.config import TrainConfig
    from subgrad.training.loop import train

    run = tmp_path_factory.mktemp("run-lenet")
    train(
        TrainConfig(
            model="lenet",
            optimizer="sgd",
            data=str(real_archive()),
            out=str(run),
            device="cpu",
            steps=60,
            batch_size=128,
            quiet=True,
        )
    )
    return export_run(run, run / "lenet.onnx")
