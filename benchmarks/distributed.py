"""Data-parallel steps/s and communicated bytes per step: 1 vs N processes (torchrun), CPU or GPU.

    python benchmarks/distributed.py --nproc 2                 # lenet and resnet20: sgd, zo-sgd, zo
    python benchmarks/distributed.py --worker ...              # (internal: what each rank runs)

Each configuration runs ``--steps`` optimizer steps on a fixed random global batch (the data path is not
what is measured), first in one process, then under torchrun with N processes (each takes its shard; for
zo each runs the clean pass on the whole batch and the perturbed tails of its shard).  Bytes are the
payload this rank hands to collectives (``subgrad.training.distributed.Communicator``): the flat gradient for
first-order, the step's 2q float64 losses for zo-sgd, its shard's per-example float32 loss differences
(one per site and head) for zo.  Scaling efficiency =
(steps/s with N processes) / (N x steps/s with 1 process) at the same global batch: 1.0 is perfect
scaling, 1/N means no gain.  Writes results/distributed-<device>.json.

zo divides only its perturbed passes among ranks (each rank runs the clean pass and the weight products
for the whole batch, which is what keeps its traffic to per-example scalars).  What that split can buy,
apart from this machine's core count and the collectives, is measured in one process with one thread:
the time of a 1-rank step against the time of one rank's share of an N-rank step (the gather replaced by a
copy of its own values; same shapes, same work): ``zo_share`` rows, ``speedup_bound`` = the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench_common import add_device_argument, pick_device, write_result


class _RankZeroOf:
    """Rank 0 of ``world_size`` ranks whose others sent the same differences: the gather without a network."""

    def __init__(self, world_size: int):
        self.rank, self.world_size = 0, world_size

    def all_gather_examples(self, d):
        return d.repeat(1, self.world_size)


def worker(model_name: str, optimizer: str, steps: int, batch: int, device: str) -> dict:
    from subgrad import optim
    from subgrad.models import build_model
    from subgrad.training.distributed import from_environment, shutdown, weights_hash

    comm = from_environment(device)
    dev = torch.device(device, comm.local_rank) if device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(model_name).to(dev)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    if optimizer != "zo":  # zo: every rank gets the global batch and runs its share of the perturbed passes
        x, y = comm.shard(x), comm.shard(y)
    x, y = x.to(dev), y.to(dev)
    params = [p for p in model.parameters()]
    replicas = comm if comm.active else None
    if optimizer == "zo":
        torch.manual_seed(1)  # the training-only heads: the same on every rank
        opt = optim.ActivityZO(model, lr=1e-3, example=x[:1], replicas=replicas)
    elif optimizer == "zo-sgd":
        opt = optim.ZOSGD(model.named_parameters(), lr=1e-3, eps=1e-3, q=1, replicas=replicas)
    else:
        opt = optim.SGD(params, lr=0.01, momentum=0.9, replicas=replicas)

    def one_step():
        if optimizer == "zo":
            opt.step(x, y)
            return
        if optimizer == "zo-sgd":
            opt.step(lambda: F.cross_entropy(model(x), y))
            return
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    one_step()  # warm-up (and Triton compilation on GPUs)
    comm.barrier()
    sent0 = comm.bytes_sent
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    comm.barrier()
    seconds = time.perf_counter() - start
    step_bytes = comm.bytes_sent - sent0
    comm.sync_buffers_(model)  # BatchNorm running statistics (resnet20): averaged once, as training does
    hashes = comm.all_gather_strings(weights_hash(model) + (weights_hash(opt.heads) if optimizer == "zo" else ""))
    result = dict(
        model=model_name,
        optimizer=optimizer,
        world_size=comm.world_size,
        steps=steps,
        batch=batch,
        steps_per_second=steps / seconds,
        bytes_per_step=step_bytes / steps,
        replicas_identical=len(set(hashes)) == 1,
        parameters=sum(p.numel() for p in params),
    )
    shutdown(comm)
    return result


def zo_share(model_name: str, batch: int, world: int, steps: int, device: str) -> dict:
    """Seconds per zo step of one process vs of one rank's share of a ``world``-rank step (one thread,
    interleaved, best of ``steps``): how much of the step the split of the perturbed passes removes."""
    from subgrad import optim
    from subgrad.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one rank, one core (or one GPU): the split's effect without contention
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    opts = {}
    for w in (1, world):
        torch.manual_seed(0)
        opts[w] = optim.ActivityZO(
            build_model(model_name).to(dev), lr=1e-3, example=x[:1], replicas=_RankZeroOf(w) if w > 1 else None
        )
    best = {w: float("inf") for w in opts}
    for _ in range(steps + 1):  # the first round warms up
        for w, opt in opts.items():
            start = time.perf_counter()
            opt.step(x, y)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best[w] = min(best[w], time.perf_counter() - start)
    torch.set_num_threads(threads)
    return dict(
        model=model_name,
        optimizer="zo_share",
        world_size=world,
        batch=batch,
        seconds_one_process=best[1],
        seconds_one_rank_share=best[world],
        speedup_bound=best[1] / best[world],
    )


def run(model_name, optimizer, steps, batch, device, nproc) -> dict:
    args = [
        "--worker",
        "--model",
        model_name,
        "--optimizer",
        optimizer,
        "--steps",
        str(steps),
        "--batch",
        str(batch),
        "--device",
        device,
    ]
    if nproc == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            __file__,
            *args,
        ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--optimizer", default="zo-sgd", help="(--worker only) sgd, zo-sgd or zo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    add_device_argument(parser)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    args.device = pick_device(args.device).type  # the workers get the resolved device
    if args.worker:
        result = worker(args.model, args.optimizer, args.steps, args.batch, args.device)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from subgrad.training.distributed import exit_worker

            exit_worker(0)
        return

    rows = []
    print(
        f"{'model':<10}{'optimizer':<9}{'procs':>6}{'steps/s':>10}{'bytes/step':>13}{'efficiency':>12}{'replicas':>10}"
    )
    for model_name in ("lenet", "resnet20"):
        for optimizer in ("sgd", "zo-sgd", "zo"):
            single = run(model_name, optimizer, args.steps, args.batch, args.device, 1)
            multi = run(model_name, optimizer, args.steps, args.batch, args.device, args.nproc)
            multi["scaling_efficiency"] = multi["steps_per_second"] / single["steps_per_second"] / args.nproc
            for r in (single, multi):
                eff = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else "-"
                print(
                    f"{model_name:<10}{optimizer:<9}{r['world_size']:>6}{r['steps_per_second']:>10.2f}"
                    f"{r['bytes_per_step']:>13.0f}{eff:>12}{'same' if r['replicas_identical'] else 'DIFFER':>10}"
                )
                rows.append(r)
    print(f"\nzo, one thread: a 1-process step vs one rank's share of a {args.nproc}-rank step (best of {args.steps})")
    for model_name in ("lenet", "resnet20"):
        r = zo_share(model_name, args.batch, args.nproc, args.steps, args.device)
        print(
            f"{model_name:<10} {r['seconds_one_process'] * 1e3:9.1f} ms {r['seconds_one_rank_share'] * 1e3:9.1f} ms"
            f"   speedup bound {r['speedup_bound']:.2f}x"
        )
        rows.append(r)
    report = dict(
        device=args.device,
        cpu_count=os.cpu_count(),
        nproc=args.nproc,
        steps=args.steps,
        global_batch=args.batch,
        rows=rows,
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"distributed-{args.device}.json")
    write_result(path, report, args.device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
