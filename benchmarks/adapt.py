"""Forward-only adaptation of exports (``subgrad adapt``) against what an engineer with torch would do.

    python benchmarks/adapt.py --data ../shared/data/cifar10-jpeg.tar.gz [--json PATH] [--plot PATH]

For the LeNet and ResNet-20 exports (``--lenet RUN_DIR`` / ``--resnet20 RUN_DIR``: trained run folders;
without them a run is trained here with the recipe in RECIPES), per CIFAR-10-C corruption
(``subgrad corrupt``'s scenario: adapt/ and eval/ halves of the test set, severity 5):

* frozen accuracy on the evaluation half, clean and shifted;
* ``subgrad adapt`` labelled (cross-entropy) and unlabelled (``--unlabelled``'s default objective), the
  fp32 export and the INT8 one (``subgrad quantize``; affine only: its weights are int8);
* backprop in torch on the same parameters (a per-channel affine after each layer, as the export's
  ``affine``), the same examples and steps: Adam on cross-entropy, and on prediction entropy (``tent``:
  TENT's objective on the export's parameters); for ResNet-20 also TENT as published
  (``tent_batch_statistics``: BatchNorm on batch statistics, its affine adapted, batch-statistics
  predictions);
* ResNet-20: BatchNorm statistics re-estimated on the adaptation half (Schneider et al., 2020), which the
  folded export cannot do;
* seconds per step and in all (final evaluation excluded), and the peak resident memory of a process
  adapting against one that only runs inference at the same batch.

Recovery = adapted minus frozen shifted accuracy.  Every comparison runs in this one invocation.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import write_result  # noqa: E402

RECIPES = {"lenet": dict(epochs=15), "resnet20": dict(epochs=8)}  # SGD at the model's defaults otherwise
THREADS = 2  # onnxruntime and torch alike: the VM's cores


def trained_run(name: str, run_dir, data, work: pathlib.Path) -> pathlib.Path:
    if run_dir:
        return pathlib.Path(run_dir)
    from subgrad.training.config import TrainConfig
    from subgrad.training.loop import train

    out = work / f"run-{name}"
    if not (out / "model.pt").is_file():
        train(
            TrainConfig(
                model=name, optimizer="sgd", data=str(data), out=str(out), device="cpu", quiet=True, **RECIPES[name]
            )
        )
    return out


def exports(name: str, run: pathlib.Path, work: pathlib.Path, data) -> dict:
    from subgrad.export.exporter import export_run
    from subgrad.export.quantize import quantize

    fp32 = work / f"{name}.onnx"
    if not fp32.is_file():
        export_run(run, fp32, data=data)
    int8 = work / f"{name}.int8.onnx"
    if not int8.is_file():
        report = quantize(fp32, data, int8, max_drop=100.0)  # its accuracy is reported, not gated, here
        assert report["written"], report
    return dict(fp32=fp32, int8=int8)


# -- torch baselines --------------------------------------------------------------------------------
def affine_sites(model):
    """The modules whose outputs the export's layers produce: a BatchNorm right after its convolution
    (folded into it in the export), else the convolution or linear layer itself."""
    import torch.nn as nn

    modules = list(model.modules())
    sites = []
    for i, m in enumerate(modules):
        if isinstance(m, nn.Conv2d):
            nxt = modules[i + 1] if i + 1 < len(modules) else None
            sites.append(nxt if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == m.out_channels else m)
        elif isinstance(m, nn.Linear):
            sites.append(m)
    return sites


def torch_adapt(model, pixels, labels, index_of_step, steps, objective, lr, info) -> tuple[float, object]:
    """Adam on a per-channel affine after each layer (the model itself frozen, BatchNorm in eval mode as
    exported); returns (seconds, the model with its affine hooks in place)."""
    import torch
    import torch.nn.functional as F

    model.eval().requires_grad_(False)
    params = []
    for site in affine_sites(model):
        if isinstance(site, torch.nn.Linear):
            shape = (1, site.out_features)
        else:
            shape = (1, site.num_features if isinstance(site, torch.nn.BatchNorm2d) else site.out_channels, 1, 1)
        scale, shift = torch.ones(shape, requires_grad=True), torch.zeros(shape, requires_grad=True)
        site.register_forward_hook(lambda mod, inp, out, s=scale, t=shift: out * s + t)
        params += [scale, shift]
    optimizer = torch.optim.Adam(params, lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        index = index_of_step(step)
        x = torch.from_numpy(info.prepare(pixels[index]))
        logits = model(x)
        if objective == "cross_entropy":
            loss = F.cross_entropy(logits, torch.from_numpy(labels[index]))
        else:
            logp = logits.log_softmax(1)
            loss = -(logp.exp() * logp).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, model


def torch_accuracy(model, pixels, labels, info) -> float:
    import torch

    with torch.no_grad():
        logits = torch.cat(
            [model(torch.from_numpy(info.prepare(pixels[i : i + 500]))) for i in range(0, len(pixels), 500)]
        )
    return float((logits.argmax(1).numpy() == labels).mean())


def tent_published(run: pathlib.Path, pixels, index_of_step, steps, lr, info, batch_size) -> tuple[float, object]:
    """TENT as published (Wang et al., ICLR 2021): BatchNorm on the batch's statistics, its affine adapted
    by Adam on the prediction entropy; predictions with batch statistics too (batches of ``batch_size``)."""
    import torch

    from subgrad.export.exporter import load_run

    model, _, _ = load_run(run)
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            m.weight.requires_grad_(True), m.bias.requires_grad_(True)
            params += [m.weight, m.bias]
    optimizer = torch.optim.Adam(params, lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        logp = model(torch.from_numpy(info.prepare(pixels[index_of_step(step)]))).log_softmax(1)
        loss = -(logp.exp() * logp).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, model


def batch_stats_accuracy(model, pixels, labels, info, batch_size) -> float:
    """Accuracy with predictions made in shuffled batches (the folders are sorted by class, and a batch of
    one class has that class's statistics)."""
    import torch

    order = np.random.default_rng(0).permutation(len(pixels))
    pixels, labels = pixels[order], labels[order]
    with torch.no_grad():
        logits = torch.cat(
            [
                model(torch.from_numpy(info.prepare(pixels[i : i + batch_size])))
                for i in range(0, len(pixels), batch_size)
            ]
        )
    return float((logits.argmax(1).numpy() == labels).mean())


def bn_reestimated(run: pathlib.Path, pixels, info):
    """Schneider et al. (2020): BatchNorm's statistics recomputed on the target images (cumulative, the
    source statistics dropped), then evaluated as usual."""
    import torch

    from subgrad.export.exporter import load_run

    model, _, _ = load_run(run)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(pixels), 250):
            model(torch.from_numpy(info.prepare(pixels[i : i + 250])))
    return model.eval()


# -- memory: a fresh process each ----------------------------------------------------------------------
MEMORY_SCRIPT = """
import json, resource, sys
import numpy as np
path, mode, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
pixels = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
if mode == "inference":  # the deploy runtime alone: no onnx import
    from subgrad.export.runtime import Predictor
    p = Predictor(path, ["CPUExecutionProvider"], batch_size=batch, threads=2)
    for _ in range(10): p.logits_from_pixels(pixels)
else:
    from subgrad.export.adapt import Adapter
    a = Adapter(path, params=mode, threads=2)
    for _ in range(10): a.step(pixels, np.arange(batch) % 10)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child reports its parent's peak
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps(dict(peak_rss_mib=hwm / 1024,
                      torch_imported=any(m == "torch" or m.startswith("torch.") for m in sys.modules))))
"""


def peak_memory(path, mode: str, batch: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path), mode, str(batch)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def _clear_state(out: pathlib.Path) -> None:
    import shutil

    shutil.rmtree(out.with_name(out.name + ".adapt-state"), ignore_errors=True)


# -- one model ----------------------------------------------------------------------------------------
def run_model(name, run, files, scenario, args, progress) -> dict:
    from subgrad.export.adapt import AdaptSettings
    from subgrad.export.adapt_data import batch_indices, load_adapt_data
    from subgrad.export.adapt_run import adapt_file
    from subgrad.export.exporter import load_run
    from subgrad.export.runtime import Predictor

    predictor = {kind: Predictor(path, ["CPUExecutionProvider"], threads=THREADS) for kind, path in files.items()}
    info = predictor["fp32"].info
    classes, size = info.class_names, (info.height, info.width)
    clean = load_adapt_data(scenario / "clean", classes, size, True)
    result = dict(
        clean={
            k: float((p.logits_from_pixels(clean.held_out.pixels, 500).argmax(1) == clean.held_out.labels).mean())
            for k, p in predictor.items()
        },
        corruptions={},
    )
    # adapting where nothing shifted must not cost accuracy: unlabelled adaptation on clean images
    out = args.work / f"{name}-clean-unlabelled.onnx"
    _clear_state(out)
    report = adapt_file(
        files["fp32"],
        scenario / "clean",
        out,
        unlabelled=True,
        steps=args.steps,
        batch_size=args.batch_size,
        settings=AdaptSettings(objective=args.unlabelled_objective),
        threads=THREADS,
        progress=False,
    )
    result["clean_unlabelled"] = dict(before=report["before"]["accuracy"], after=report["after"]["accuracy"])
    result["memory"] = dict(
        batch=args.batch_size,
        inference=peak_memory(files["fp32"], "inference", args.batch_size),
        adapting_affine=peak_memory(files["fp32"], "affine", args.batch_size),
    )
    progress(name, result)
    for corruption in args.corruptions:
        data = load_adapt_data(scenario / corruption, classes, size, True)
        row = dict(
            frozen={
                k: float((p.logits_from_pixels(data.held_out.pixels, 500).argmax(1) == data.held_out.labels).mean())
                for k, p in predictor.items()
            }
        )
        for kind in ("fp32", "int8"):
            for unlabelled in (False, True) if kind == "fp32" or args.int8_unlabelled else (False,):
                label = f"zo_{'unlabelled' if unlabelled else 'labelled'}_{kind}"
                out = args.work / f"{name}-{corruption}-{label}.onnx"
                _clear_state(out)
                settings = AdaptSettings(objective=args.unlabelled_objective if unlabelled else "cross_entropy")
                report = adapt_file(
                    files[kind],
                    scenario / corruption,
                    out,
                    unlabelled=unlabelled,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    settings=settings,
                    threads=THREADS,
                    progress=False,
                )
                row[label] = dict(
                    accuracy=report["after"]["accuracy"],
                    seconds=report["seconds"],
                    seconds_per_step=report["seconds_per_step"],
                    skipped=report["skipped"],
                )
                if not unlabelled or kind == "fp32":  # clean accuracy after an unlabelled adaptation
                    adapted = Predictor(out, ["CPUExecutionProvider"], threads=THREADS)
                    row[label]["clean_accuracy"] = float(
                        (
                            adapted.logits_from_pixels(clean.held_out.pixels, 500).argmax(1) == clean.held_out.labels
                        ).mean()
                    )
        import torch

        torch.set_num_threads(THREADS)
        for objective, label in (("cross_entropy", "backprop_labelled"), ("entropy", "tent")):
            model, _, _ = load_run(run)
            seconds, model = torch_adapt(
                model,
                data.adapt.pixels,
                data.adapt.labels,
                lambda step: batch_indices(len(data.adapt), args.batch_size, 0, step),
                args.steps,
                objective,
                args.torch_lr,
                info,
            )
            row[label] = dict(
                accuracy=torch_accuracy(model, data.held_out.pixels, data.held_out.labels, info),
                seconds=round(seconds, 3),
                seconds_per_step=round(seconds / args.steps, 5),
            )
            row[label]["clean_accuracy"] = torch_accuracy(model, clean.held_out.pixels, clean.held_out.labels, info)
        if name == "resnet20":
            seconds, model = tent_published(
                run,
                data.adapt.pixels,
                lambda step: batch_indices(len(data.adapt), args.batch_size, 0, step),
                args.steps,
                args.torch_lr,
                info,
                args.batch_size,
            )
            row["tent_batch_statistics"] = dict(
                accuracy=batch_stats_accuracy(model, data.held_out.pixels, data.held_out.labels, info, args.batch_size),
                clean_accuracy=batch_stats_accuracy(
                    model, clean.held_out.pixels, clean.held_out.labels, info, args.batch_size
                ),
                seconds=round(seconds, 3),
            )
            model = bn_reestimated(run, data.adapt.pixels, info)
            row["bn_reestimated"] = dict(
                accuracy=torch_accuracy(model, data.held_out.pixels, data.held_out.labels, info)
            )
        frozen = row["frozen"]["fp32"]
        for key in ("zo_labelled_fp32", "backprop_labelled", "zo_unlabelled_fp32", "tent"):
            row[key]["recovery"] = round(row[key]["accuracy"] - frozen, 4)
        result["corruptions"][corruption] = row
        print(
            f"{name} {corruption}: "
            + ", ".join(
                f"{k} {v['accuracy'] if isinstance(v, dict) and 'accuracy' in v else v}" for k, v in row.items()
            ),
            flush=True,
        )
        result["summary"] = summarize(result)
        progress(name, result)
    return result


def summarize(result: dict) -> dict:
    """The issue's targets from the rows so far."""
    rows = result["corruptions"].values()
    zo = [r["zo_labelled_fp32"]["recovery"] for r in rows]
    bp = [r["backprop_labelled"]["recovery"] for r in rows]
    counted = [(z, b) for z, b in zip(zo, bp) if b >= 0.03]
    return dict(
        corruptions=len(zo),
        zo_labelled_recovery_mean=float(np.mean(zo)),
        backprop_labelled_recovery_mean=float(np.mean(bp)),
        recovered_fraction_where_backprop_recovers_3_points=(
            float(np.mean([z for z, _ in counted]) / np.mean([b for _, b in counted])) if counted else None
        ),
        unlabelled_shift_gain_mean=float(np.mean([r["zo_unlabelled_fp32"]["recovery"] for r in rows])),
        unlabelled_on_clean_images_change=result["clean_unlabelled"]["after"] - result["clean_unlabelled"]["before"],
        unlabelled_forgetting_mean=float(
            np.mean([r["zo_unlabelled_fp32"]["clean_accuracy"] for r in rows]) - result["clean"]["fp32"]
        ),
        memory_ratio=result["memory"]["adapting_affine"]["peak_rss_mib"]
        / result["memory"]["inference"]["peak_rss_mib"],
    )


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["frozen", "zo_labelled_fp32", "backprop_labelled", "zo_unlabelled_fp32", "tent", "bn_reestimated"]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        corruptions = list(result["corruptions"])
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            values = [result["corruptions"][c].get(key) for c in corruptions]
            values = [(v["fp32"] if key == "frozen" else v["accuracy"]) if v else 0 for v in values]
            ax.bar(np.arange(len(corruptions)) + k * width, values, width, label=key)
        ax.set_xticks(np.arange(len(corruptions)) + 0.4 - width / 2, corruptions, rotation=15)
        ax.set_title(f"{name}: held-out accuracy after adaptation")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    from subgrad.export.corrupt import CORRUPTIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 (any layout subgrad train accepts)")
    parser.add_argument("--lenet", help="a trained LeNet run folder (default: trained here)")
    parser.add_argument("--resnet20", help="a trained ResNet-20 run folder (default: trained here)")
    parser.add_argument("--models", default="lenet,resnet20")
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--torch-lr", type=float, default=1e-3, help="Adam's lr for the backprop baselines (TENT's)")
    parser.add_argument("--unlabelled-objective", default="foa")
    parser.add_argument("--work", default="/tmp/subgrad-adapt-bench", help="runs, exports and the scenario")
    parser.add_argument(
        "--no-int8-unlabelled", dest="int8_unlabelled", action="store_false", help="INT8: labelled adaptation only"
    )
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory rows (exports must exist)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    args.corruptions = args.corruptions.split(",")
    args.work = pathlib.Path(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    scenario = args.work / "scenario"
    if not (scenario / "clean").is_dir():
        from subgrad.data import load_cifar10
        from subgrad.export.corrupt import write_scenario

        d = load_cifar10(args.data, download=False)
        write_scenario(d.test_images, d.test_labels, d.classes, scenario)
    results = {}

    def progress(name, result, complete=False):  # the JSON after every row: a long run is never all lost
        results[name] = result
        payload = dict(
            steps=args.steps,
            batch_size=args.batch_size,
            threads=THREADS,
            severity=5,
            complete=complete,
            results=results,
        )
        if args.json:
            write_result(args.json, payload, "cpu")

    if args.memory_only:
        memory = {
            name: {
                mode: peak_memory(args.work / f"{name}.onnx", mode, args.batch_size) for mode in ("inference", "affine")
            }
            for name in args.models.split(",")
        }
        write_result(args.json, dict(batch_size=args.batch_size, threads=THREADS, memory=memory), "cpu")
        print(json.dumps(memory))
        return
    for name in args.models.split(","):
        run = trained_run(name, getattr(args, name), args.data, args.work)
        result = run_model(name, run, exports(name, run, args.work, args.data), scenario, args, progress)
        print(json.dumps({name: result["summary"]}), flush=True)
    progress(name, result, complete=True)
    if args.plot:
        plot(results, args.plot)
    print(f"peak rss of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
