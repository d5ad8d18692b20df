"""ActivityZO on a user's own model: the block cut traced with torch.fx (subgrad/optim/activity_graph.py).

Fast tier but for the two torchvision models' training runs (about 30 s each on the 2-core VM: slow tier).
Tolerances: the traced blocks reproduce the model's forward exactly (the same modules in the same order);
a tail normalises with the batch statistics computed apart from the BatchNorm module's (another summation
order), so tails compare to 1e-5; BatchNorm1d's carried estimate against autograd to 1e-5 in float32.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from test_activity import _ThreadGather, assert_cut_is_the_forward
from user_model_fixture import small_cnn  # the README test's user model

from subgrad.models import build_model
from subgrad.optim import ActivityZO
from subgrad.optim.activity_blocks import ALL, batch_stats, local_blocks, through_batch_stats
from subgrad.optim.activity_graph import traced_blocks


def relu6_cnn() -> nn.Module:
    """BatchNorm, ReLU6 and ReLU in place, pooling by max and by average."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU6(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def mlp() -> nn.Module:
    """Linear layers with BatchNorm1d and dropout."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10)
    )


def small_resnet() -> nn.Module:
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)


def small_mobilenet() -> nn.Module:
    return torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)


MODELS = dict(small_cnn=small_cnn, relu6_cnn=relu6_cnn, mlp=mlp, resnet=small_resnet, mobilenet=small_mobilenet)
MODELS.update(lenet=lambda: build_model("lenet"), resnet20=lambda: build_model("resnet20"))


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", list(MODELS))
def test_traced_blocks_are_the_model_forward(name):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    for m in model.modules():  # the cut draws its own dropout masks (reused by the tails): compare without
        if isinstance(m, nn.Dropout):
            m.eval()
    assert_cut_is_the_forward(model, traced_blocks)


@pytest.mark.parametrize("name", list(MODELS))
def test_traced_tails_recompute_the_block_and_are_per_example(name):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    x, _ = _batch(6)
    rows = slice(2, 5)
    with torch.no_grad():
        h = x
        for b, block in enumerate(traced_blocks(model)):
            clean = block.run(h)
            for j, site in enumerate(clean.sites):
                where = f"block {b} site {j}"
                whole = clean.tail(j, site.z + 0.1, ALL)
                torch.testing.assert_close(clean.tail(j, site.z, ALL), clean.out, rtol=1e-5, atol=1e-5, msg=where)
                part = clean.tail(j, site.z[rows] + 0.1, rows)
                torch.testing.assert_close(part, whole[rows], rtol=1e-5, atol=1e-5, msg=where)
            h = clean.out


@pytest.mark.parametrize("name", ["lenet", "resnet20", "localnet"])
def test_built_in_models_trace_to_their_hand_written_cut(name):
    """The traced cut puts the same layers in the same blocks as the hand-written one."""
    model = build_model(name)

    def layers(blocks):
        return [[id(m) for m in b.modules() if isinstance(m, (nn.Conv2d, nn.Linear))] for b in blocks]

    assert layers(traced_blocks(model)) == layers(local_blocks(model))


@pytest.mark.parametrize(
    "name, steps",
    [("small_cnn", 30), ("relu6_cnn", 30), ("mlp", 30)]
    + [pytest.param(m, 20, marks=pytest.mark.slow) for m in ("resnet18", "mobilenet_v2")],
)
def test_a_user_model_trains_without_a_cut_of_its_own(name, steps):
    """ActivityZO(model) on a model with no local_blocks(): its loss on one fixed batch falls."""
    torch.manual_seed(0)
    build = MODELS.get(name) or (lambda: getattr(torchvision.models, name)(num_classes=10))
    model = build().train()
    x, y = _batch(32)
    opt = ActivityZO(model, lr=2e-3, q=2)
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    for _ in range(steps):
        opt.step(x, y)
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    print(f"{name}: {len(opt.blocks)} blocks, loss {before:.4f} -> {after:.4f}")
    assert after < 0.98 * before, f"{name}: loss {before:.4f} -> {after:.4f}"  # one fixed batch: no noise to pass


def test_a_sites_active_units_follow_the_activation_derivative():
    """conv -> BatchNorm -> ReLU6 -> 2x2 max-pool: a unit moves the loss where ReLU6 passes it (0 < x < 6)
    and it is its window's maximum."""
    torch.manual_seed(0)
    model = relu6_cnn().train()
    x, _ = _batch(4)
    with torch.no_grad():
        block = traced_blocks(model)[0]
        site = block.run(x).sites[0]
        normed = F.batch_norm(site.z, *batch_stats(site.z), model[1].weight, model[1].bias, True, 0.0, model[1].eps)
        act = F.relu6(normed)
        _, where = F.max_pool2d(act, 2, return_indices=True)
        chosen = torch.zeros_like(act, dtype=torch.bool).flatten(2).scatter_(2, where.flatten(2), True).view_as(act)
    expected = (normed > 0) & (normed < 6) & chosen
    assert torch.equal(site.active, expected)
    assert site.through_stats is not None  # BatchNorm right after the conv


@pytest.mark.parametrize("name, settings", [("relu6_cnn", dict(patches=2, groups=2)), ("resnet", dict(groups=2))])
def test_a_traced_unit_moves_only_its_own_part_loss(name, settings):
    """As for the hand-written cuts: perturbing one unit changes the local loss of the part ``site_parts``
    names for it, and no other; a site whose tail mixes units (a residual unit's first conv) uses the
    block's whole loss (None)."""
    torch.manual_seed(0)
    model = MODELS[name]().train()
    opt = ActivityZO(model, **settings)
    x, y = _batch(2)
    g = torch.Generator().manual_seed(1)
    checked, whole_loss = 0, 0
    with torch.no_grad():
        h = x
        for b, block in enumerate(opt.blocks[:-1]):
            clean = block.run(h)
            for j, site in enumerate(clean.sites):
                loss = opt.local_losses(b, clean.tail(j, site.z, ALL), y)[0]
                parts = opt.site_parts[b][j]
                if parts is None:
                    whole_loss += 1
                    continue
                units = site.active[0] if site.active is not None else torch.ones_like(site.z[0], dtype=bool)
                units = units.flatten().nonzero().flatten()
                for k in units[torch.randint(len(units), (3,), generator=g)].tolist():
                    z = site.z.clone()
                    z.view(2, -1)[0, k] += 0.5
                    changed = (opt.local_losses(b, clean.tail(j, z, ALL), y)[0] != loss).nonzero().tolist()
                    assert changed in ([[int(parts[k]), 0]], []), (b, j, k, int(parts[k]), changed)
                    checked += bool(changed)
            h = clean.out
    assert checked >= 3, checked
    assert (whole_loss > 0) == (name == "resnet")  # its units' first convs


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) if x.sum() > 0 else -self.fc(x.flatten(1))


class FunctionalWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 3 * 32 * 32))

    def forward(self, x):
        return F.linear(x.flatten(1), self.weight)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x, scale):
        return self.fc(x.flatten(1)) * scale


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(self.conv(x)))).flatten(1))


def _tied():
    first, second = nn.Linear(3 * 32 * 32, 3 * 32 * 32), nn.Linear(3 * 32 * 32, 10)
    model = nn.Sequential(nn.Flatten(), first, nn.ReLU(), nn.Linear(3 * 32 * 32, 3 * 32 * 32), nn.ReLU(), second)
    model[3].weight = first.weight  # tied weights
    return model


@pytest.mark.parametrize(
    "model, message",
    [
        (DataDependent(), "could not trace DataDependent"),
        (FunctionalWeight(), "parameter weight is used outside a module"),
        (TwoInputs(), "one input"),
        (nn.Sequential(nn.Flatten(1, 2), nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 1022, 10)), "Conv1d"),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(4096, 10)),
            "reflect",
        ),
        (nn.Sequential(nn.Conv2d(3, 4, 3)), r"output must be logits \(batch, classes\)"),
        (CalledTwice(), "module conv is called twice"),
        (_tied(), "module 3 shares a parameter with 1"),
    ],
    ids=[
        "data-dependent",
        "functional-weight",
        "two-inputs",
        "conv1d",
        "reflect-padding",
        "no-logits",
        "called-twice",
        "tied",
    ],
)
def test_what_cannot_be_cut_is_refused_with_the_reason(model, message):
    with pytest.raises(ValueError, match=message):
        ActivityZO(model)


def test_an_explicit_cut_is_used_as_given():
    model = small_cnn()
    blocks = traced_blocks(model)
    assert ActivityZO(model, cut=blocks).blocks == blocks
    with pytest.raises(ValueError, match="non-empty list"):
        ActivityZO(model, cut=[])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_batchnorm1d_carried_estimate_is_batchnorm_backward(dtype, tol):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5).to(dtype).train()
    z = torch.randn(8, 5, dtype=dtype)
    upstream = torch.randn(8, 5, dtype=dtype)
    zf = z.clone().requires_grad_(True)
    (bn(zf) * upstream).sum().backward()
    zz = z.clone().requires_grad_(True)  # the same BatchNorm with the statistics held fixed: what tails measure
    fixed = F.batch_norm(zz, *batch_stats(z), bn.weight, bn.bias, False, 0.0, bn.eps)
    (g_fixed,) = torch.autograd.grad((fixed * upstream).sum(), zz)
    carried = through_batch_stats(bn, z, batch_stats(z))(g_fixed)
    torch.testing.assert_close(carried, zf.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["relu6_cnn", "resnet"])
def test_traced_resume_is_bit_exact(name):
    """Stopped after one step and resumed from the state dicts, a traced model ends bit-identical."""
    x1, y1 = _batch(8, seed=1)
    x2, y2 = _batch(8, seed=2)
    torch.manual_seed(0)
    model = MODELS[name]().train()
    opt = ActivityZO(model, lr=2e-3, seed=7, q=2)
    opt.step(x1, y1)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.step(x2, y2)
    torch.manual_seed(123)  # another init: everything must come from the saved state
    resumed = MODELS[name]().train()
    resumed.load_state_dict(saved_model)
    ropt = ActivityZO(resumed, lr=2e-3, seed=7, q=2)
    ropt.load_state_dict(saved_opt)
    ropt.step(x2, y2)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(a, b) for a, b in zip(opt.heads.parameters(), ropt.heads.parameters()))


@pytest.mark.parametrize("name", ["relu6_cnn", "resnet"])
def test_traced_data_parallel_sends_per_example_scalars_only(name):
    """Two ranks (threads) each run the tails of half the batch: replicas stay bit-identical and what
    crosses is n/2 x (sites + heads) float32 values per rank and step, never a weight."""
    x, y = _batch(8)
    torch.manual_seed(0)
    replicas = [MODELS[name]().train()]
    replicas.append(copy.deepcopy(replicas[0]))
    gather, opts = _ThreadGather(2), []
    for rank, model in enumerate(replicas):
        torch.manual_seed(1)  # the heads' init, as every rank of a run draws it
        opts.append(ActivityZO(model, lr=1e-3, seed=4, replicas=gather.for_rank(rank)))
    for _ in range(2):
        threads = [threading.Thread(target=o.step, args=(x, y)) for o in opts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    a, b = replicas
    assert all(torch.equal(p, r) for p, r in zip(a.state_dict().values(), b.state_dict().values()))
    sites = sum(block.num_sites for block in opts[0].blocks)
    assert gather.sent == [2 * (8 // 2) * (sites + len(opts[0].heads)) * 4] * 2, gather.sent


@pytest.mark.parametrize("name", ["lenet", "localnet"])
def test_traced_conv_relu_pool_sites_are_the_hand_written_ones(name):
    """conv -> ReLU -> 2x2 max-pool: the traced cut perturbs the pooled units, as the hand-written cut does;
    same activity, same active units, same gradient carried back to the conv output."""
    torch.manual_seed(0)
    model = build_model(name).train()
    x, _ = _batch(4)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        h = x
        for traced, hand in zip(traced_blocks(model), local_blocks(model)):
            a, b = traced.run(h).sites[0], hand.run(h).sites[0]
            assert a.layer is b.layer and torch.equal(a.z, b.z)
            assert (a.active is None) == (b.active is None) and (a.active is None or torch.equal(a.active, b.active))
            assert (a.unpool is None) == (b.unpool is None)
            if a.unpool is not None:
                grad = torch.randn(a.z.shape, generator=g)
                assert torch.equal(a.unpool(grad), b.unpool(grad))
            h = hand.run(h).out
