"""`subgrad bench`: PyTorch eager vs onnxruntime latency and throughput for an exported model.

Same thread count on both sides (``torch.set_num_threads`` = onnxruntime ``intra_op_num_threads``, one
inter-op thread), warm-up runs first, then ``runs`` timed runs per batch size (default 200): p50, p95 and
p99 latency, throughput (images per second of wall time over the timed runs) and session-creation time.
onnxruntime providers: CPU always; CUDA and TensorRT too when this onnxruntime has them and torch sees a
GPU (each compared with eager PyTorch on the same device).  A provider that cannot run is reported with
its error, not hidden.  Eager PyTorch: see :func:`torch_model` (``torch_weights`` in the report says which).
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np
import torch

from .runtime import ModelInfo, Predictor, open_session

BATCH_SIZES = (1, 32, 256)
#: Timed runs per batch size and side (``subgrad bench --runs``, ``subgrad run --bench-runs``).
TIMED_RUNS = 200


def torch_model(model_path, info: ModelInfo, run_dir=None, code: str | None = None) -> tuple[torch.nn.Module, str]:
    """The eager side: the run's model when ``run_dir`` is given, else the registered architecture with
    the ONNX initializers when every name matches (not after the exporter folds BatchNorm into convs),
    else the architecture with random weights (timing depends on the architecture, not the values)."""
    import onnx
    from onnx import numpy_helper

    from subgrad.models import build_model

    from .exporter import WithPreprocessing, load_run

    if run_dir is not None:
        model, _, _ = load_run(run_dir, code)
        weights = f"run {run_dir}"
    else:
        model = build_model(info.model_name, code_named=code, **info.raw.get("model_config", {}))
        inits = {t.name: t for t in onnx.load(str(model_path)).graph.initializer}
        state = model.state_dict()
        found = {k: torch.from_numpy(numpy_helper.to_array(inits[k]).copy()) for k in state if k in inits}
        weights = "onnx"
        if len(found) == len(state):
            model.load_state_dict(found)
        else:
            weights = f"random init ({len(found)}/{len(state)} tensors matched by name; pass --run for the run's)"
    if info.preprocessing_in_graph:
        model = WithPreprocessing(model, info.mean, info.std)
    return model.eval(), weights


def _stats(times: list[float], batch: int) -> dict:
    t = np.asarray(times) * 1e3
    return dict(
        p50_ms=float(np.percentile(t, 50)),
        p95_ms=float(np.percentile(t, 95)),
        p99_ms=float(np.percentile(t, 99)),
        mean_ms=float(t.mean()),
        throughput=float(batch * len(t) / (t.sum() / 1e3)),
        runs=len(t),
    )


def time_runs(fn, runs: int, warmup: int, sync=lambda: None) -> list[float]:
    """Seconds per call of ``fn`` over ``runs`` calls after ``warmup`` untimed ones (``sync`` after each)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _bench_provider(model_path, info, model, provider: str, device: str, batch_sizes, runs, warmup, threads) -> dict:
    providers = {
        "CPUExecutionProvider": ["CPUExecutionProvider"],
        "CUDAExecutionProvider": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "TensorrtExecutionProvider": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    }[provider]
    creation = []
    for _ in range(3):
        start = time.perf_counter()
        session = open_session(model_path, providers, threads)
        creation.append(time.perf_counter() - start)
    used = session.get_providers()[0]
    result = dict(
        provider=provider,
        provider_used=used,
        session_create_ms=float(np.median(creation) * 1e3),
        torch_device=device,
        batches={},
    )
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = model.to(device)
    out_name = session.get_outputs()[0].name
    for bs in batch_sizes:
        pixels = rng.integers(0, 256, (bs, info.height, info.width, 3), dtype=np.uint8)
        feed = info.prepare(pixels)
        x = torch.from_numpy(feed).to(device)
        if device == "cuda":  # keep onnxruntime's input and output on the GPU, as eager's are
            import onnxruntime as ort

            binding = session.io_binding()
            binding.bind_ortvalue_input(info.input_name, ort.OrtValue.ortvalue_from_numpy(feed, "cuda", 0))
            binding.bind_output(out_name, "cuda")
            run_onnx = lambda: session.run_with_iobinding(binding)  # noqa: E731
        else:
            run_onnx = lambda: session.run([out_name], {info.input_name: feed})  # noqa: E731

        def run_torch():
            with torch.inference_mode():
                model(x)

        eager = _stats(time_runs(run_torch, runs, warmup, sync), bs)
        onnx_ = _stats(time_runs(run_onnx, runs, warmup), bs)
        result["batches"][str(bs)] = dict(
            torch=eager,
            onnxruntime=onnx_,
            p50_speedup=eager["p50_ms"] / onnx_["p50_ms"],
            throughput_ratio=onnx_["throughput"] / eager["throughput"],
        )
    return result


def bench(
    model_path,
    batch_sizes=BATCH_SIZES,
    runs: int = TIMED_RUNS,
    warmup: int = 20,
    threads: int | None = None,
    providers: list[str] | None = None,
    run_dir=None,
    code: str | None = None,
) -> dict:
    """Benchmark ``model_path``; returns the report (one entry per onnxruntime provider)."""
    import onnxruntime as ort

    from subgrad import __version__
    from subgrad.run_folder import versions

    if runs < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("--runs must be >= 1, --warmup >= 0 and batch sizes positive")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    info = Predictor(model_path, ["CPUExecutionProvider"]).info
    model, weights = torch_model(model_path, info, run_dir, code)
    available = ort.get_available_providers()
    if providers is None:
        providers = ["CPUExecutionProvider"]
        if torch.cuda.is_available():
            providers += [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p in available]
    missing = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p not in available]
    report = dict(
        model=str(model_path),
        model_name=info.model_name,
        threads=threads,
        runs=runs,
        warmup=warmup,
        torch_weights=weights,
        onnxruntime=ort.__version__,
        versions=dict(versions(), subgrad=__version__),
        cpu=_cpu_name(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        providers_not_installed=missing,
        results=[],
    )
    for provider in providers:
        device = "cpu" if provider == "CPUExecutionProvider" else "cuda"
        try:
            report["results"].append(
                _bench_provider(model_path, info, model, provider, device, batch_sizes, runs, warmup, threads)
            )
        except Exception as exc:  # a GPU provider that is installed but cannot run: report, do not hide
            report["results"].append(dict(provider=provider, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
    return report


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def render_table(report: dict) -> str:
    lines = [
        f"{report['model_name']}  threads {report['threads']}  runs {report['runs']}  cpu: {report['cpu']}",
        f"{'provider':<28}{'batch':>6}{'eager p50 ms':>14}{'ort p50 ms':>12}{'ort p99 ms':>12}"
        f"{'eager img/s':>13}{'ort img/s':>12}{'p50 x':>8}{'thru x':>8}",
    ]
    for res in report["results"]:
        if "error" in res:
            lines.append(f"{res['provider']:<28} failed: {res['error']}")
            continue
        name = res["provider_used"] + ("" if res["provider_used"] == res["provider"] else " (fallback)")
        for bs, row in res["batches"].items():
            lines.append(
                f"{name:<28}{bs:>6}{row['torch']['p50_ms']:>14.3f}{row['onnxruntime']['p50_ms']:>12.3f}"
                f"{row['onnxruntime']['p99_ms']:>12.3f}{row['torch']['throughput']:>13.0f}"
                f"{row['onnxruntime']['throughput']:>12.0f}{row['p50_speedup']:>8.2f}"
                f"{row['throughput_ratio']:>8.2f}"
            )
        lines.append(f"{'':<28}session creation {res['session_create_ms']:.1f} ms")
    if report["providers_not_installed"]:
        lines.append("not installed in this onnxruntime: " + ", ".join(report["providers_not_installed"]))
    return "\n".join(lines)
