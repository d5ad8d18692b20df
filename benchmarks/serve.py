"""Requests per second and latency of a model served by `subgrad serve`, against Predictor in process,
and the cost of subgrad's HTTP front against Triton's own HTTP port in the same run.

    python benchmarks/serve.py [--json PATH] [--plot PATH] [--model MODEL.onnx] [--seconds 4] [--rounds 4]

Starts ``subgrad serve MODEL.onnx`` as a user does (its own process: the serve extra's Triton server,
python backend, dynamic batching, the HTTP front) on loopback ports, then for each path (HTTP through
the front; HTTP straight to Triton's own port behind it, read from the server's log; gRPC) and client
concurrency (1, 4, 16, 64) sends batch-1 requests of real CIFAR-10 test images as binary tensors from
asyncio clients (tritonclient's aio API; one event loop, so client and server share the cores as they
would on one machine) for ``--seconds`` or ``--max-requests``, whichever comes first, split into
``--rounds`` turns in which the paths alternate (the machine's speed drifts; each path sees the same
drift).  Beside it, in the same run, the same images through ``Predictor`` in process at batch 1 and
batch 16.  Every answer is checked against Predictor's logits (bit for bit); a wrong or failed answer
counts as an error.

With ``socat`` on PATH, a fourth path, ``http-socat``: socat relaying to Triton's own port, a relay in C
that checks nothing, so the cost of the hop alone on this machine.

Rows: ``path`` (``http``, ``http-direct``, ``grpc``, ``http-socat``, ``predictor``), ``concurrency``, ``batch``,
``requests``, ``errors``, ``seconds``, ``requests_per_s``, ``images_per_s``, ``p50_ms``, ``p99_ms``.
``targets.front_cost_c1_p50``: the HTTP concurrency-1 median through the front over the direct one
(goal: at most 1.10).  Without ``--model`` a LeNet is trained for 30 steps on the team's archive (its
weights do not change the cost).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ARCHIVE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
CONCURRENCY = (1, 4, 16, 64)
#: http: through subgrad's HTTP front (what clients get); http-direct: Triton's own HTTP port behind it
#: (loopback only; the front's cost is the difference); grpc: Triton's own gRPC port; http-socat (when
#: socat is on PATH): a relay in C that checks nothing, the cost of the hop alone.
PATHS = ("http", "http-direct", "grpc", "http-socat")
#: The issue's bound on the front's cost: HTTP batch-1 median at concurrency 1, front over direct.
FRONT_COST_BOUND = 1.10
MODEL = "lenet"


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q)) if values else float("nan")


def row(path, concurrency, batch, latencies, errors, seconds):
    return {
        "path": path,
        "concurrency": concurrency,
        "batch": batch,
        "requests": len(latencies) + errors,
        "errors": errors,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "images_per_s": round(len(latencies) * batch / seconds, 1),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
    }


async def load(protocol, port, feeds, expected, concurrency, seconds, max_requests):
    """``concurrency`` tasks sending batch-1 requests until the time or request budget is spent:
    (latencies of the right answers, errors, seconds)."""
    if protocol.startswith("http"):
        import tritonclient.http.aio as client_module

        client = client_module.InferenceServerClient(f"localhost:{port}", conn_limit=concurrency)
    else:
        import tritonclient.grpc.aio as client_module

        client = client_module.InferenceServerClient(f"localhost:{port}")
    latencies, errors, sent = [], [0], [0]
    deadline = time.perf_counter() + seconds

    async def worker(w):
        k = w
        while time.perf_counter() < deadline and sent[0] < max_requests:
            sent[0] += 1
            k = (k + 1) % len(feeds)
            item = client_module.InferInput("input", list(feeds[k].shape), "FP32")
            item.set_data_from_numpy(feeds[k])
            start = time.perf_counter()
            try:
                result = await client.infer(MODEL, [item])
                good = np.array_equal(result.as_numpy("logits"), expected[k])
            except Exception:  # a failed request is an error of the row, whatever it is
                good = False
            if good:
                latencies.append(time.perf_counter() - start)
            else:
                errors[0] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return latencies, errors[0], elapsed


def served_rows(ports, feeds, expected, seconds, max_requests, rounds):
    paths = [path for path in PATHS if path in ports]
    """Rows of every path and concurrency.  Each path's rows pool ``rounds`` runs of ``seconds / rounds``,
    the paths taking turns within a round, so that the front and Triton's own port see the same machine."""
    pooled = {}
    for _ in range(rounds):
        for concurrency in CONCURRENCY:
            for path in paths:
                latencies, errors, elapsed = asyncio.run(
                    load(path, ports[path], feeds, expected, concurrency, seconds / rounds, max_requests // rounds)
                )
                total = pooled.setdefault((path, concurrency), [[], 0, 0.0])
                total[0] += latencies
                total[1] += errors
                total[2] += elapsed
    return [row(path, c, 1, *pooled[(path, c)]) for path in paths for c in CONCURRENCY]


def internal_http_port(log_path: str) -> int:
    """Triton's own HTTP port (loopback, behind the front), from the line its server logs at start."""
    found = re.findall(r"Started HTTPService at 127\.0\.0\.1:(\d+)", pathlib.Path(log_path).read_text())
    if not found:
        raise SystemExit(f"no 'Started HTTPService' line in {log_path}")
    return int(found[-1])


def predictor_rows(predictor, pixels, seconds, max_requests):
    rows = []
    for batch in (1, 16):
        latencies, deadline, k = [], time.perf_counter() + seconds, 0
        predictor.logits_from_pixels(pixels[:batch], batch)  # warm
        start = time.perf_counter()
        while time.perf_counter() < deadline and len(latencies) * batch < max_requests:
            chunk = pixels[k : k + batch]
            k = (k + batch) % (len(pixels) - batch)
            t = time.perf_counter()
            predictor.logits_from_pixels(chunk, batch)
            latencies.append(time.perf_counter() - t)
        rows.append(row("predictor", 1, batch, latencies, 0, time.perf_counter() - start))
    return rows


def trained_model(folder: pathlib.Path, archive: pathlib.Path) -> pathlib.Path:
    from subgrad.export.exporter import export_run
    from subgrad.training.config import TrainConfig
    from subgrad.training.loop import train

    train(
        TrainConfig(
            model="lenet",
            optimizer="sgd",
            data=str(archive),
            out=str(folder / "run"),
            device="cpu",
            steps=30,
            batch_size=128,
            quiet=True,
        )
    )
    return export_run(folder / "run", folder / f"{MODEL}.onnx")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for protocol, marker in (("http", "o"), ("http-direct", "^"), ("grpc", "s"), ("http-socat", "v")):
        points = [r for r in rows if r["path"] == protocol]
        if not points:
            continue
        ax.plot(
            [r["concurrency"] for r in points],
            [r["images_per_s"] for r in points],
            marker=marker,
            label=f"Triton, {protocol}, batch-1 requests",
        )
    for r, style in zip([r for r in rows if r["path"] == "predictor"], (":", "--")):
        ax.axhline(r["images_per_s"], linestyle=style, color="gray", label=f"Predictor in process, batch {r['batch']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("client concurrency")
    ax.set_ylabel("images / s")
    ax.legend(fontsize=8)
    ax.set_title("subgrad serve, LeNet, loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, help="write the rows here (default: print only)")
    parser.add_argument("--plot", type=pathlib.Path, help="write a PNG here (default: beside --json)")
    parser.add_argument("--model", type=pathlib.Path, help="an exported MODEL.onnx (default: train a LeNet)")
    parser.add_argument("--data", type=pathlib.Path, default=ARCHIVE, help="CIFAR-10 archive for the test images")
    parser.add_argument("--seconds", type=float, default=4.0, help="time budget of each row")
    parser.add_argument("--max-requests", dest="max_requests", type=int, default=20000, help="request budget per row")
    parser.add_argument("--rounds", type=int, default=4, help="turns the paths take within each row's time")
    args = parser.parse_args()

    from bench_common import versions, write_result
    from subgrad.data import load_cifar10
    from subgrad.export.runtime import Predictor
    from subgrad.export.serve import free_port

    pixels = load_cifar10(args.data).test_images[:256]
    with tempfile.TemporaryDirectory(prefix="subgrad-serve-bench-") as scratch:
        scratch = pathlib.Path(scratch)
        model = args.model or trained_model(scratch, args.data)
        predictor = Predictor(model)
        feeds = [predictor.preprocess(pixels[k : k + 1]) for k in range(len(pixels))]
        expected = [predictor.logits_from_pixels(pixels[k : k + 1]) for k in range(len(pixels))]
        rows = predictor_rows(predictor, pixels, args.seconds, args.max_requests)
        served = scratch / f"{MODEL}.onnx"
        if model != served:
            shutil.copyfile(model, served)  # the served model's name is the file's stem
        ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        server = subprocess.Popen(
            [sys.executable, "-m", "subgrad", "serve", str(served), *(f"--{k}-port={v}" for k, v in ports.items())],
            stdout=subprocess.PIPE,
            text=True,
        )
        relay = None
        try:
            banner = []
            while not banner or "Ctrl-C" not in banner[-1]:
                banner.append(server.stdout.readline())
                if not banner[-1]:
                    raise SystemExit("subgrad serve exited before it was ready")
            version = banner[0].split("Triton Inference Server ")[1].split()[0]
            ports["http-direct"] = internal_http_port(
                next(b for b in banner if b.strip().startswith("log")).split()[-1]
            )
            if shutil.which("socat"):
                ports["http-socat"] = free_port()
                relay = subprocess.Popen(
                    ["socat", f"TCP-LISTEN:{ports['http-socat']},fork,reuseaddr,bind=127.0.0.1,nodelay"]
                    + [f"TCP:127.0.0.1:{ports['http-direct']},nodelay"]
                )
                time.sleep(0.5)
            for path in PATHS:
                if path in ports:
                    asyncio.run(load(path, ports[path], feeds, expected, 1, 1.0, 200))  # warm-up, not reported
            rows += served_rows(ports, feeds, expected, args.seconds, args.max_requests, args.rounds)
        finally:
            if relay is not None:
                relay.kill()
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    header = f"{'path':10} {'conc':>5} {'batch':>5} {'req/s':>9} {'img/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
    print(header)
    for r in rows:
        print(
            f"{r['path']:10} {r['concurrency']:5d} {r['batch']:5d} {r['requests_per_s']:9.1f} {r['images_per_s']:9.1f} "
            f"{r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['errors']:7d}"
        )
    by = {(r["path"], r["concurrency"]): r for r in rows if r["path"] != "predictor"}
    targets = {
        "http_c1_p50_ms": by[("http", 1)]["p50_ms"],
        "front_cost_c1_p50": round(by[("http", 1)]["p50_ms"] / by[("http-direct", 1)]["p50_ms"], 3),
        "socat_cost_c1_p50": round(by[("http-socat", 1)]["p50_ms"] / by[("http-direct", 1)]["p50_ms"], 3)
        if ("http-socat", 1) in by
        else None,
        "http_c16_over_c1_throughput": round(by[("http", 16)]["requests_per_s"] / by[("http", 1)]["requests_per_s"], 2),
        "grpc_c16_over_c1_throughput": round(by[("grpc", 16)]["requests_per_s"] / by[("grpc", 1)]["requests_per_s"], 2),
    }
    print(
        f"the HTTP front's cost: batch-1 median at concurrency 1 through the front over Triton's own port "
        f"{targets['front_cost_c1_p50']:.3f}x (goal <= {FRONT_COST_BOUND}x: "
        f"{'met' if targets['front_cost_c1_p50'] <= FRONT_COST_BOUND else 'not met'}); a relay that checks "
        f"nothing (socat): {targets['socat_cost_c1_p50'] or 'not measured (no socat on PATH)'}x"
    )
    print(
        f"targets: HTTP batch-1 median at concurrency 1 {targets['http_c1_p50_ms']:.3f} ms (goal <= 1 ms); "
        f"throughput at concurrency 16 over 1: HTTP {targets['http_c16_over_c1_throughput']}x, gRPC "
        f"{targets['grpc_c16_over_c1_throughput']}x (goal >= 2x)"
    )
    if args.json:
        import onnxruntime

        payload = {
            "benchmark": "serve",
            "versions": dict(versions(), onnxruntime=onnxruntime.__version__, tritonserver=version),
            "seconds_per_row": args.seconds,
            "targets": targets,
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_result(args.json, payload, "cpu")
        plot(rows, args.plot or args.json.with_suffix(".png"))
        print(f"wrote {args.json} and {args.plot or args.json.with_suffix('.png')}")
    return 0 if not any(r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
