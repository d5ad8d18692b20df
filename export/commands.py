"""The export and deploy commands of ``subgrad``: export, validate, bench, quantize, predict, package, serve
(adapt and corrupt: adapt_commands).  Each wraps a library function of :mod:`subgrad.export`; flags a user
left out are not passed, so the library's signatures hold every default (:func:`add_commands`)."""

from __future__ import annotations

import argparse
import os
import sys

from .adapt_commands import add_adapt_commands


def _cmd_export(args: argparse.Namespace) -> int:
    from subgrad.export.exporter import export_run

    path = export_run(
        args.run,
        args.out,
        with_preprocessing=args.with_preprocessing,
        **_given(args, opset="opset", code="code", data="data"),
    )
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); checked with onnx.checker (full) and strict shape "
        "inference"
    )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from subgrad.export.validate import validate

    report = validate(
        args.model,
        args.run,
        args.data,
        limit=args.limit,
        **_given(
            args, batch_sizes="batch_sizes", min_agreement="min_agreement", max_abs_diff="max_abs_diff", code="code"
        ),
    )
    print(
        f"{report['images']} images  agreement {report['agreement']:.5f}  max |diff| {report['max_abs_diff']:.3g}  "
        f"accuracy torch {report['accuracy_torch']:.4f} onnx {report['accuracy_onnx']:.4f}"
    )
    for failure in report["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    where = os.path.join(os.path.dirname(os.path.abspath(args.model)), "validation.md")
    print(f"{'passed' if report['passed'] else 'failed'}; report in {where}")
    return 0 if report["passed"] else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from subgrad.export.bench import bench, render_table
    from subgrad.run_folder import atomic_write_text

    report = bench(
        args.model,
        threads=args.threads,
        run_dir=args.run,
        **_given(args, batch_sizes="batch_sizes", runs="runs", warmup="warmup", code="code"),
    )
    print(render_table(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from subgrad.export.quantize import quantize

    r = quantize(
        args.model,
        args.data,
        args.out,
        limit=args.limit,
        **_given(args, mode="mode", max_drop="max_drop", calibration_images="calibration_images"),
    )
    acc = "n/a" if r["accuracy_quantized"] is None else f"{r['accuracy_quantized']:.4f}"
    print(
        f"{r['settings']['mode']}: accuracy {r['accuracy_fp32']:.4f} -> {acc} on {r['images']} test images, "
        f"size x{r['size_ratio']:.2f}"
        + "".join(f", {k.replace('_', ' ')} x{r[k]:.2f}" for k in ("speedup_batch1", "speedup_batch256") if k in r)
    )
    if not r["written"]:
        print(f"refused: {r['reason']}", file=sys.stderr)
        return 1
    print(f"wrote {r['out']}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from subgrad.export.runtime import ImageError, Predictor, load_image

    predictor = Predictor(args.model, **_given(args, batch_size="batch_size"))
    failed = 0
    for path in args.images:  # one image at a time through load_image, so a bad file costs only its own line
        try:
            pixels = load_image(path, predictor.info.height, predictor.info.width)
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        (top,) = predictor.predict([pixels], top_k=args.top_k)
        print(f"{path}: " + ", ".join(f"{label} {p:.3f}" for label, p in top))
    if failed:
        print(f"{failed} of {len(args.images)} images failed", file=sys.stderr)
    return 1 if failed else 0


def _given(args: argparse.Namespace, **names: str) -> dict:
    """{parameter: value} for the flags the user gave (argparse default None): the library's signature
    holds each default."""
    return {param: getattr(args, flag) for param, flag in names.items() if getattr(args, flag) is not None}


def _cmd_package(args: argparse.Namespace) -> int:
    from subgrad.export.triton_repo import package_triton

    folder = package_triton(
        args.model,
        args.triton_repo,
        **_given(
            args,
            name="name",
            max_batch_size="max_batch_size",
            instances="instances",
            kind="kind",
            max_queue_delay_us="max_queue_delay_us",
            backend="backend",
        ),
    )
    files = ", ".join(str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file())
    print(f"wrote Triton model repository entry {folder} ({files})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import pathlib
    import signal
    import tempfile

    from subgrad.export.serve import (
        ADMIN_KEY_ENV,
        GRPC_ADMIN_HEADER,
        TritonServer,
        admin_key_from_env,
        serve_until,
    )
    from subgrad.export.triton_install import find_server
    from subgrad.export.triton_repo import package_triton

    source = pathlib.Path(args.model)
    packaging = _given(args, max_batch_size="max_batch", max_queue_delay_us="max_queue_delay_us", instances="instances")
    if args.restarts < 0:
        raise ValueError(f"--restarts must be 0 or more, got {args.restarts}")
    admin_key = admin_key_from_env()
    server = find_server()
    with tempfile.TemporaryDirectory(prefix="subgrad-repo-") as scratch:
        if source.is_dir():
            if packaging:
                raise ValueError(
                    "--max-batch, --max-queue-delay-us and --instances apply when serving MODEL.onnx; "
                    f"for a repository, edit {source}/<model>/config.pbtxt"
                )
            repository = source
        else:
            repository = pathlib.Path(scratch)
            package_triton(source, repository, backend=server.backend, **packaging)
        stop = []

        def on_signal(signum, frame):
            stop.append(signal.Signals(signum).name)

        def say(line):
            print(f"subgrad serve: {line}", file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        triton = TritonServer(
            repository,
            args.http_port,
            args.grpc_port,
            args.metrics_port,
            log_path=args.log,
            server=server,
            host=args.host,
            admin_key=admin_key,
        )
        try:
            triton.start()
            address = f"[{args.host}]" if ":" in args.host else args.host
            for name, backend in triton.models.items():
                print(
                    f"serving {name} ({backend} backend) with Triton Inference Server {triton.version} from "
                    f"{server.origin}"
                )
                print(f"  HTTP     http://{address}:{args.http_port}/v2/models/{name}/infer")
            print(f"  gRPC     {address}:{args.grpc_port}")
            print(f"  metrics  http://{address}:{args.metrics_port}/metrics")
            print(f"  log      {triton.log_path}")
            if args.host in ("127.0.0.1", "::1", "localhost"):
                print(f"  exposed  to this machine only ({args.host}); --host 0.0.0.0 serves other machines")
            else:
                print(
                    f"  exposed  on {args.host}: every machine that reaches it can send inference requests "
                    "(no TLS, no client authentication)"
                )
            print(
                "  admin    model repository, shared memory, trace, logging: closed "
                + (
                    f"without the key in {ADMIN_KEY_ENV} (HTTP header subgrad-admin-key, gRPC {GRPC_ADMIN_HEADER})"
                    if admin_key
                    else f"to every client (set {ADMIN_KEY_ENV} to hold a key)"
                )
            )
            print("Ctrl-C (or SIGTERM) drains in-flight requests and stops", flush=True)
            status = serve_until(triton, lambda: bool(stop), say, restarts=args.restarts)
            if status:
                return status
            print(f"{stop[0]}: draining in-flight requests and stopping", flush=True)
        finally:  # a ServeError goes on to main(): one line, exit 2
            status = triton.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        print(f"stopped (server exit status {status})")
        return 0


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,7,64, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {value!r}")
    return sizes


def _add_code_argument(parser) -> None:
    parser.add_argument(
        "--code",
        metavar="package.module:callable",
        help="the run's model, when it is your constructor: subgrad imports code only when you name it here",
    )


def add_commands(sub) -> None:
    """The export and deploy subcommands, on ``subgrad``'s subparsers ``sub``."""
    ex = sub.add_parser(
        "export",
        help="export a run folder's model to ONNX",
        description="Export RUN's final weights with torch.onnx.export(dynamo=True), dynamic batch, "
        "metadata for deployment; checked before it is written.",
    )
    ex.add_argument("run", metavar="RUN_DIR")
    ex.add_argument("--out", required=True, help="the .onnx file to write")
    ex.add_argument(
        "--with-preprocessing",
        dest="with_preprocessing",
        action="store_true",
        help="take raw NHWC uint8 pixels: normalisation inside the graph",
    )
    ex.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, the lowest it supports)")
    ex.add_argument(
        "--data", help="training data for the layer statistics that subgrad adapt aligns to (default: the run's)"
    )
    _add_code_argument(ex)
    ex.set_defaults(func=_cmd_export)

    va = sub.add_parser(
        "validate",
        help="PyTorch vs onnxruntime on the CIFAR-10 test set",
        description="Run the test set through the run's PyTorch model and through onnxruntime at "
        "several batch sizes; exit 1 when a check fails. Writes validation.json/.md "
        "beside the model.",
    )
    va.add_argument("model", metavar="MODEL.onnx")
    va.add_argument("--run", required=True, metavar="RUN_DIR", help="the run folder the model was exported from")
    va.add_argument("--data", default="./data", help="CIFAR-10 (any layout subgrad train accepts)")
    va.add_argument("--batch-sizes", dest="batch_sizes", type=_batch_sizes, help="comma-separated")
    va.add_argument("--min-agreement", dest="min_agreement", type=float, help="top-1 agreement needed to pass")
    va.add_argument("--max-abs-diff", dest="max_abs_diff", type=float, help="largest |logit difference| that passes")
    va.add_argument("--limit", type=int, help="only the first N test images (default: all 10,000)")
    _add_code_argument(va)
    va.set_defaults(func=_cmd_validate)

    be = sub.add_parser(
        "bench",
        help="latency/throughput: PyTorch eager vs onnxruntime",
        description="Equal threads on both sides, warm-up, then timed runs: p50/p95/p99 latency, "
        "throughput, session creation; CUDA/TensorRT providers too when present.",
    )
    be.add_argument("model", metavar="MODEL.onnx")
    be.add_argument("--json", help="also write the report to this JSON file")
    be.add_argument("--batch-sizes", dest="batch_sizes", type=_batch_sizes, help="comma-separated")
    be.add_argument("--runs", type=int, help="timed runs per batch size")
    be.add_argument("--warmup", type=int, help="untimed runs first")
    be.add_argument("--threads", type=int, help="threads for both sides (default: torch's default)")
    be.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="eager side from this run folder (default: rebuilt from the ONNX file's metadata and weights)",
    )
    _add_code_argument(be)
    be.set_defaults(func=_cmd_bench)

    qu = sub.add_parser(
        "quantize",
        help="static INT8 (QDQ, per-channel) or fp16, gated on test accuracy",
        description="Quantize, measure accuracy on the test set, size and speed; refuse to write "
        "(exit 1) when accuracy drops more than --max-drop points.",
    )
    qu.add_argument("model", metavar="MODEL.onnx")
    qu.add_argument("--data", default="./data", help="CIFAR-10: training images calibrate, test images measure")
    qu.add_argument("--out", help="output file (default MODEL.int8.onnx / MODEL.fp16.onnx)")
    qu.add_argument("--mode", choices=["int8", "fp16"], help="default int8")
    qu.add_argument("--max-drop", dest="max_drop", type=float, help="largest accuracy drop allowed, in points")
    qu.add_argument("--calibration-images", dest="calibration_images", type=int, help="training images that calibrate")
    qu.add_argument("--limit", type=int, help="only the first N test images")
    qu.set_defaults(func=_cmd_quantize)

    pr = sub.add_parser(
        "predict",
        help="top-k labels for image files",
        description="Classify images with an exported model (onnxruntime only); an unreadable "
        "image gets its own error line; exit 1 when any failed.",
    )
    pr.add_argument("model", metavar="MODEL.onnx")
    pr.add_argument("images", metavar="IMAGE", nargs="+")
    pr.add_argument("--top-k", dest="top_k", type=int, default=3)
    pr.add_argument("--batch-size", dest="batch_size", type=int, help="images per onnxruntime run")
    pr.set_defaults(func=_cmd_predict)

    pa = sub.add_parser(
        "package",
        help="write an NVIDIA Triton Inference Server model repository",
        description="config.pbtxt (onnxruntime_onnx, dynamic batching), labels.txt, 1/model.onnx.",
    )
    pa.add_argument("model", metavar="MODEL.onnx")
    pa.add_argument("--triton-repo", dest="triton_repo", required=True, metavar="DIR")
    pa.add_argument("--name", help="model name in Triton (default: the file's stem)")
    pa.add_argument(
        "--backend",
        help="onnxruntime (platform onnxruntime_onnx, NVIDIA's "
        "containers; the default) or python (subgrad's runtime, also takes encoded image files)",
    )
    pa.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    pa.add_argument(
        "--max-queue-delay-us",
        dest="max_queue_delay_us",
        type=int,
        help="dynamic batching's wait for more requests, in microseconds",
    )
    pa.add_argument("--instances", type=int, help="model instances")
    pa.add_argument(
        "--kind",
        choices=["KIND_GPU", "KIND_CPU"],
        help="instance kind (default KIND_GPU for onnxruntime, KIND_CPU for python)",
    )
    pa.set_defaults(func=_cmd_package)

    from subgrad.export.serve import DEFAULT_HOST, RESTARTS

    se = sub.add_parser(
        "serve",
        help="serve a model with a real NVIDIA Triton Inference Server",
        description="Start Triton Inference Server on MODEL.onnx (packaged for the server found: "
        "tritonserver on PATH -> onnxruntime backend, else the serve extra's server -> "
        "python backend) or on a repository folder; wait until ready, print the "
        "endpoints; SIGINT/SIGTERM drains and stops.",
    )
    se.add_argument("model", metavar="MODEL.onnx|REPO")
    se.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address the HTTP, gRPC and metrics ports listen on (default {DEFAULT_HOST}: this machine only; "
        "0.0.0.0: every interface)",
    )
    se.add_argument("--http-port", dest="http_port", type=int, default=8000)
    se.add_argument("--grpc-port", dest="grpc_port", type=int, default=8001)
    se.add_argument("--metrics-port", dest="metrics_port", type=int, default=8002)
    se.add_argument("--max-batch", dest="max_batch", type=int, help="max_batch_size (as subgrad package)")
    se.add_argument(
        "--max-queue-delay-us",
        dest="max_queue_delay_us",
        type=int,
        help="dynamic batching's wait for more requests, in microseconds",
    )
    se.add_argument("--instances", type=int, help="model instances")
    se.add_argument("--log", help="the server's log file (default: a file in the temp folder, printed)")
    se.add_argument(
        "--restarts",
        type=int,
        default=RESTARTS,
        help=f"times a server that dies is started again within 10 minutes before serve exits 1 (default {RESTARTS})",
    )
    se.set_defaults(func=_cmd_serve)
    add_adapt_commands(sub)  # adapt, corrupt
