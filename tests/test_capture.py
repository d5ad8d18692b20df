"""Every optimizer's step is capturable, checked on the GPU code path without a GPU (Triton kernels in the
interpreter, ``backend="triton"``; on a CUDA machine the same tests run compiled on the device): no host
synchronisation, the same launches at consecutive steps, and
a replay of step t's launches (what a CUDA graph does) equal to an ordinary step t + 1, bit for bit.
A non-capturable AdamW is the control: its host-side step count makes consecutive launch lists differ.
LeNet, batch 4, and ResNet-20's zo step (BatchNorm); the forward-only optimizers are in the slow tier (each
step runs ~10 interpreted kernels over 62K weights: 10-30 s apiece; ResNet-20's zo about a minute)."""

import copy
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, assert_bitwise_equal
from subgrad.models import build_model
from subgrad.optim import SGD, ZOSGD, ActivityZO, AdamW, HiZOO, ZOAdam
from subgrad.testing import SyncCounter, record_step, tensors_in

BATCH = 4


def _batch():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(BATCH, 3, 32, 32, generator=g).to(DEVICE),
        torch.randint(0, 10, (BATCH,), generator=g).to(DEVICE),
    )


def _lr():
    return torch.tensor(1e-3, device=DEVICE)  # a tensor lr: a schedule writes it in place, the kernels read it


#: name -> (optimizer factory, kind): "grad" steps on gradients already there, "closure" evaluates the
#: loss, "blocks" is ActivityZO's step(inputs, targets)
OPTIMIZERS = {
    "sgd": (lambda m: SGD(m.parameters(), lr=_lr(), momentum=0.9, weight_decay=5e-4, backend="triton"), "grad"),
    "adamw": (lambda m: AdamW(m.parameters(), lr=_lr(), weight_decay=5e-4, capturable=True, backend="triton"), "grad"),
    "zo-sgd": (
        lambda m: ZOSGD(
            m.named_parameters(), lr=_lr(), blocks="module", clip=0.2, scale_by_block_size=True, backend="triton"
        ),
        "closure",
    ),
    "zo-adam": (
        lambda m: ZOAdam(m.named_parameters(), lr=_lr(), q=4, estimator="forward", backend="triton"),
        "closure",
    ),
    "hizoo": (lambda m: HiZOO(m.named_parameters(), lr=_lr(), eps=1e-2, momentum=0.9, backend="triton"), "closure"),
    "zo": (lambda m: ActivityZO(m, lr=1e-3, backend="triton"), "blocks"),
}


def _setup(name):
    torch.manual_seed(0)
    model = build_model("lenet").to(DEVICE).train()
    factory, kind = OPTIMIZERS[name]
    return model, factory(model), kind


def _stepper(model, opt, kind, x, y):
    if kind == "grad":
        torch.manual_seed(1)
        for p in model.parameters():  # gradients as a backward pass leaves them (not part of the step)
            p.grad = torch.randn_like(p)
        return opt.step
    if kind == "closure":
        return lambda: opt.step(lambda: F.cross_entropy(model(x), y))
    return lambda: opt.step(x, y)


def _state(model, opt):
    """Weights, then every tensor and number of the optimizer's state_dict, in a fixed order."""
    out = [t.detach().clone() for t in model.state_dict().values()]

    def walk(value):
        if isinstance(value, torch.Tensor):
            out.append(value.detach().clone())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(value[k])
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(torch.tensor(value))

    walk(opt.state_dict())
    return out


@pytest.mark.parametrize(
    "name", [n if OPTIMIZERS[n][1] == "grad" else pytest.param(n, marks=pytest.mark.slow) for n in OPTIMIZERS]
)
def test_step_is_capturable(name):
    _check_capturable(name, *_setup(name))


@pytest.mark.slow
def test_resnet20_zo_step_is_capturable():
    """ResNet-20's zo step adds what LeNet's has not: BatchNorm tails and every site's estimate carried
    through the batch statistics (per-channel reductions on the device)."""
    torch.manual_seed(0)
    model = build_model("resnet20").to(DEVICE).train()
    _check_capturable("zo resnet20", model, ActivityZO(model, lr=1e-3, backend="triton"), "blocks")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu6_cnn", "small_cnn"])
def test_traced_cut_zo_step_is_capturable(name):
    """A user's model cut by tracing (subgrad.optim.activity_graph), with no host read in the step: relu6_cnn
    has BatchNorm, ReLU6 in place, a max-pool's argmax mask and a global average; small_cnn a pooled site
    (conv -> ReLU -> max-pool, perturbed at the pooled units)."""
    from test_activity_graph import MODELS

    torch.manual_seed(0)
    model = MODELS[name]().to(DEVICE).train()
    _check_capturable(f"zo traced {name}", model, ActivityZO(model, lr=1e-3, backend="triton"), "blocks")


def _check_capturable(name, model, opt, kind):
    x, y = _batch()
    step = _stepper(model, opt, kind, x, y)
    for _ in range(2):  # warm-up: state created, first-step branches taken (as before a graph capture)
        step()
    twin_model, twin_opt = copy.deepcopy((model, opt))  # the state at step t
    twin_step = _stepper(twin_model, twin_opt, kind, x, y)
    persistent = tensors_in(model, opt, x, y)
    with SyncCounter() as syncs:
        first = record_step(step)  # step t
    assert syncs.total == 0, f"{name}: host synchronisations in one step: {syncs.counts}"
    second = record_step(step)  # step t + 1
    assert first.signature(persistent) == second.signature(persistent), (
        f"{name}: the launches of two consecutive steps differ"
    )
    first.replay()  # step t's launches, re-issued as step t + 2
    for _ in range(3):
        twin_step()
    for a, b in zip(_state(model, opt), _state(twin_model, twin_opt)):
        assert_bitwise_equal(a, b, f"{name}: replay vs ordinary step")
    counts = first.counts()
    print(f"{name}: {counts['triton']} Triton launches, {counts['aten']} ATen ops per step")
    assert counts["triton"] >= 1


def test_host_step_counter_is_not_replayable():
    """The control: a non-capturable AdamW passes its bias corrections as launch arguments, which change
    from one step to the next, so a graph of its step would replay stale corrections."""
    model = build_model("lenet").to(DEVICE).train()
    opt = AdamW(model.parameters(), lr=1e-3, backend="triton")
    step = _stepper(model, opt, "grad", None, None)
    step()
    a, b = record_step(step), record_step(step)
    persistent = tensors_in(model, opt)
    assert a.signature(persistent) != b.signature(persistent)


def test_a_host_read_is_counted():
    model = torch.nn.Linear(3, 2)
    opt = ZOSGD(model.parameters(), lr=0.1)
    opt.step(lambda: model(torch.ones(3)).sum())
    with SyncCounter() as syncs:
        _ = opt.step_count  # reads the device counter
    assert syncs.counts == {"aten::_local_scalar_dense": 1}


# -- the trainer's step -------------------------------------------------------------------------------
def _session(optimizer, kind=DEVICE.type):
    """A subgrad train session on 64 synthetic images (batch 4), single process, on device ``kind``."""
    from subgrad.data import Dataset
    from subgrad.training.config import TrainConfig
    from subgrad.training.distributed import from_environment
    from subgrad.training.run_setup import setup

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(64) % 10
    data = Dataset(images, labels, images[:8], labels[:8], tuple(f"c{i}" for i in range(10)), "synthetic")
    cfg = TrainConfig(model="lenet", optimizer=optimizer, batch_size=4, steps=40, augment=True).resolved()
    return setup(cfg, pathlib.Path("unused"), from_environment(kind), kind, data=data)


@pytest.mark.parametrize(
    "name", [n if OPTIMIZERS[n][1] == "grad" else pytest.param(n, marks=pytest.mark.slow) for n in OPTIMIZERS]
)
def test_trainer_step_is_capturable(name, monkeypatch):
    """subgrad train's step (batch gathered and augmented on the device, forward, backward where
    first-order, optimizer step, loss summed on the device) on the GPU code path: what
    ``--cuda-graph`` captures.  The host's writes between steps (lr, the epoch's order) stay outside."""
    from subgrad.training.step import TrainStep

    monkeypatch.setenv("SUBGRAD_BACKEND", "triton")
    step = TrainStep(_session(name), 0)
    for t in range(2):
        step.prepare(t)
        step()
    twin = copy.deepcopy(step)
    step.prepare(2)
    persistent = tensors_in(step.s.model, step.s.optimizer, step.s.train_loader, step)  # alive before the step
    with SyncCounter() as syncs:
        first = record_step(step)
    assert syncs.total == 0, f"train:{name}: host synchronisations in one step: {syncs.counts}"
    step.prepare(3)
    second = record_step(step)
    assert first.signature(persistent) == second.signature(persistent), f"train:{name}: consecutive steps differ"
    step.prepare(4)
    first.replay()
    for t in range(2, 5):
        twin.prepare(t)
        twin()
    for a, b in zip(
        _state(step.s.model, step.s.optimizer) + [step.counter, step.loss_sum],
        _state(twin.s.model, twin.s.optimizer) + [twin.counter, twin.loss_sum],
    ):
        assert_bitwise_equal(a, b, f"train:{name}: replay vs ordinary step")


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: a real torch.cuda.graph capture "
    "(test_trainer_step_is_capturable checks the same step without a GPU)",
)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_graph_steps_equal_eager_steps(name):
    """On a GPU, ``--cuda-graph``'s CudaGraphStep (3 eager warm-ups on a side stream, one capture, replays)
    leaves the weights, the optimizer state and the loss sum bit-identical to 7 eager steps."""
    from subgrad.capture import CudaGraphStep
    from subgrad.training.step import TrainStep

    eager, graphed = TrainStep(_session(name, "cuda"), 0), TrainStep(_session(name, "cuda"), 0)
    run_graphed = CudaGraphStep(graphed)
    for t in range(7):
        eager.prepare(t)
        eager()
        graphed.prepare(t)
        run_graphed()
    torch.cuda.synchronize()
    assert run_graphed.graph is not None, f"{name}: the step was never captured"
    for a, b in zip(
        _state(eager.s.model, eager.s.optimizer) + [eager.counter, eager.loss_sum],
        _state(graphed.s.model, graphed.s.optimizer) + [graphed.counter, graphed.loss_sum],
    ):
        assert_bitwise_equal(a, b, f"cuda graph:{name}: graphed vs eager steps")


def test_gathered_batches_are_the_indexed_ones():
    """DeviceLoader.gather (device step counter) and DeviceLoader.batch (epoch, index) give the same batches."""
    loader = _session("sgd").train_loader
    counter, seed = torch.tensor([loader.__len__() * 2 + 3]), torch.zeros(1, dtype=torch.int64)
    order = loader.order(2)
    for index in (3, 4, 5):
        x, y = loader.gather(order, counter, seed)
        xb, yb = loader.batch(2, index)
        assert torch.equal(x, xb) and torch.equal(y, yb)
    assert int(counter) == len(loader) * 2 + 6


def test_cuda_graph_on_without_cuda_is_refused_before_any_work(tmp_path):
    from subgrad.training.config import TrainConfig
    from subgrad.training.loop import train

    cfg = TrainConfig(
        model="lenet",
        optimizer="sgd",
        data=str(tmp_path / "no-data"),
        out=str(tmp_path / "r"),
        device="cpu",
        cuda_graph="on",
    )
    with pytest.raises(ValueError, match="--cuda-graph on: training on cpu, not CUDA"):
        train(cfg)
    with pytest.raises(ValueError, match="--cuda-graph must be one of"):
        TrainConfig(cuda_graph="sometimes").resolved()
