"""Data-parallel steps/s and communicated bytes per step: 1 vs N processes (torchrun), CPU or GPU.

    python benchmarks/distributed.py --nproc 2                 # lenet and resnet20, sgd and zo-sgd
    python benchmarks/distributed.py --worker ...              # (internal: what each rank runs)

Each configuration runs ``--steps`` optimizer steps on a fixed random global batch (the data path is not
what is measured), first in one process, then under torchrun with N processes (each takes its shard).
Bytes are the payload this rank hands to collectives (``subgrad.distributed.Communicator``): the flat
gradient for first-order, the step's 2q float64 losses for zeroth-order.  Scaling efficiency =
(steps/s with N processes) / (N x steps/s with 1 process) at the same global batch: 1.0 is perfect
scaling, 1/N means no gain.  Writes results/distributed-<device>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def worker(model_name: str, optimizer: str, steps: int, batch: int, device: str) -> dict:
    from subgrad import optim
    from subgrad.distributed import from_environment, shutdown, weights_hash
    from subgrad.models import build_model

    comm = from_environment(device)
    dev = torch.device(device, comm.local_rank) if device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(model_name).to(dev)
    gen = torch.Generator().manual_seed(1)
    x = comm.shard(torch.randn(batch, 3, 32, 32, generator=gen)).to(dev)
    y = comm.shard(torch.randint(0, 10, (batch,), generator=gen)).to(dev)
    params = [p for p in model.parameters()]
    if optimizer == "zo-sgd":
        opt = optim.ZOSGD(model.named_parameters(), lr=1e-3, eps=1e-3, q=1)
        opt.loss_reduce = comm.loss_reduce if comm.active else None
    else:
        opt = optim.SGD(params, lr=0.01, momentum=0.9)
        opt.grad_reduce = comm.all_reduce_mean_ if comm.active else None

    def one_step():
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
    hashes = comm.all_gather_strings(weights_hash(model))
    result = dict(model=model_name, optimizer=optimizer, world_size=comm.world_size, steps=steps, batch=batch,
                  steps_per_second=steps / seconds, bytes_per_step=step_bytes / steps,
                  replicas_identical=len(set(hashes)) == 1, parameters=sum(p.numel() for p in params))
    shutdown(comm)
    return result


def run(model_name, optimizer, steps, batch, device, nproc) -> dict:
    args = ["--worker", "--model", model_name, "--optimizer", optimizer, "--steps", str(steps), "--batch",
            str(batch), "--device", device]
    if nproc == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--optimizer", default="zo-sgd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if args.worker:
        result = worker(args.model, args.optimizer, args.steps, args.batch, args.device)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from subgrad.distributed import exit_worker
            exit_worker(0)
        return

    rows = []
    print(f"{'model':<10}{'optimizer':<9}{'procs':>6}{'steps/s':>10}{'bytes/step':>13}{'efficiency':>12}{'replicas':>10}")
    for model_name in ("lenet", "resnet20"):
        for optimizer in ("sgd", "zo-sgd"):
            single = run(model_name, optimizer, args.steps, args.batch, args.device, 1)
            multi = run(model_name, optimizer, args.steps, args.batch, args.device, args.nproc)
            multi["scaling_efficiency"] = multi["steps_per_second"] / single["steps_per_second"] / args.nproc
            for r in (single, multi):
                eff = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else "-"
                print(f"{model_name:<10}{optimizer:<9}{r['world_size']:>6}{r['steps_per_second']:>10.2f}"
                      f"{r['bytes_per_step']:>13.0f}{eff:>12}{'same' if r['replicas_identical'] else 'DIFFER':>10}")
                rows.append(r)
    name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    report = dict(device=args.device, device_name=name, cpu_count=os.cpu_count(), nproc=args.nproc, steps=args.steps,
                  global_batch=args.batch, date=datetime.date.today().isoformat(), torch=torch.__version__,
                  command=" ".join(sys.argv), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"distributed-{args.device}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
