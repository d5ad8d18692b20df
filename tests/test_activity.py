"""ActivityZO (``--optimizer zo``): the block cut, the estimate, no autograd, kernels vs twins, resume.

Tolerances: the block cut reproduces the model's forward exactly (same ops, same order); kernel and twin
steps agree bit for bit (AdamW kernel and Philox signs both have bit-identical twins); the averaged
estimate is compared with the autograd gradient of the same local loss by cosine similarity (a random
estimate, so a bound, stated at the test).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from subgrad.models import build_model
from subgrad.optim import ActivityZO
from subgrad.optim.activity_blocks import (
    ALL,
    BlockCut,
    PlainBlock,
    local_blocks,
    through_batch_stats,
    untrained_parameters,
)
from subgrad.optim.activity_heads import make_heads


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def assert_cut_is_the_forward(model, cut) -> None:
    """The blocks ``cut(twin)`` of a copy of ``model``, run one after another, give ``model``'s output and
    leave the same running statistics, exactly."""
    twin = copy.deepcopy(model)
    x, _ = _batch(4)
    with torch.no_grad():
        h = x
        for block in cut(twin):
            h = block.run(h).out
        expected = model(x)
    assert torch.equal(h, expected), (h - expected).abs().max()
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):  # running statistics too
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["lenet", "resnet20", "localnet"])
def test_block_cut_is_the_model_forward(name):
    torch.manual_seed(0)
    assert_cut_is_the_forward(build_model(name).train(), local_blocks)


@pytest.mark.parametrize("name", ["lenet", "resnet20", "localnet"])
def test_tails_recompute_the_block_output(name):
    """tail(j, z_j) from an unchanged z_j is the block output (what the finite difference subtracts), and a
    tail is per example: run on rows [2, 5) alone it gives those rows of the whole batch's tail (so ranks can
    split the rows).  Tolerance 1e-6 absolute plus 1e-6 relative (a few float32 ulps of outputs near 3): a
    ResNet tail normalises with the batch statistics computed apart from the BatchNorm module's (another
    summation order, which differs between CPUs' vector widths); LeNet's and LocalNet's are exact."""
    torch.manual_seed(0)
    model = build_model(name).train()
    x, _ = _batch(6)
    rows = slice(2, 5)
    with torch.no_grad():
        h = x
        for block in local_blocks(model):
            clean = block.run(h)
            for j, site in enumerate(clean.sites):
                whole = clean.tail(j, site.z + 0.1, ALL)
                torch.testing.assert_close(clean.tail(j, site.z, ALL), clean.out, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(clean.tail(j, site.z[rows] + 0.1, rows), whole[rows], rtol=1e-6, atol=1e-6)
                if name != "resnet20":
                    assert torch.equal(clean.tail(j, site.z, ALL), clean.out)
            h = clean.out


def test_heads_and_untrained_parameters():
    lenet, resnet = build_model("lenet"), build_model("resnet20")
    ActivityZO(lenet).step(*_batch(2))
    assert set(lenet.state_dict()) == set(build_model("lenet").state_dict())  # heads never enter the model
    heads = make_heads(local_blocks(lenet), torch.zeros(1, 3, 32, 32))
    # (parts, features, classes): conv1's 6x14x14 and conv2's 16x5x5 pooled to 4x4, fc1, fc2
    assert [tuple(h.weight.shape) for h in heads] == [(1, 96, 10), (1, 256, 10), (1, 120, 10), (1, 84, 10)]
    assert sum(p.numel() for p in heads.parameters()) == 5600
    heads = make_heads(local_blocks(lenet), torch.zeros(1, 3, 32, 32), patches=7, groups=2)
    # conv1: 7x7 patches of 2x2 x 2 groups of 3 channels; conv2: 5x5 patches (at most its size) x 2 groups of 8
    assert [tuple(h.weight.shape) for h in heads] == [(98, 12, 10), (50, 8, 10), (2, 60, 10), (2, 42, 10)]
    assert untrained_parameters(lenet, local_blocks(lenet)) == []
    names = untrained_parameters(resnet, local_blocks(resnet))
    assert names and all(".bn" in n or n.startswith("bn.") for n in names), names
    assert len(make_heads(local_blocks(resnet), torch.zeros(1, 3, 32, 32))) == 10  # stem + 9 basic blocks


PART_SETTINGS = {
    "lenet": dict(patches=7, groups=2),
    "resnet20": dict(patches=4, groups=2, norm=True),
    "localnet": dict(patches=4, groups=8, norm=True),
}


@pytest.mark.parametrize("name", ["lenet", "resnet20", "localnet"])
def test_a_unit_moves_only_its_own_part_loss(name):
    """What the per-part estimate relies on: changing one unit of a site's activity changes the local loss
    of the part ``site_parts`` names for it and no other part's, and no other example's (exactly: the other
    parts' losses are computed from unchanged values by the same ops).  Sites whose tail mixes parts
    (ResNet-20's conv1, through conv2) are mapped to None and use the whole loss."""
    torch.manual_seed(0)
    model = build_model(name).train()
    opt = ActivityZO(model, **PART_SETTINGS[name])
    x, y = _batch(2)
    g = torch.Generator().manual_seed(1)
    checked = 0
    with torch.no_grad():
        h = x
        for b, block in enumerate(opt.blocks[:-1]):
            clean = block.run(h)
            for j, site in enumerate(clean.sites):
                # the tail's own unperturbed output (a ResNet tail normalises apart from the clean pass)
                loss = opt.local_losses(b, clean.tail(j, site.z, ALL), y)[0]
                parts = opt.site_parts[b][j]
                if parts is None:
                    assert name == "resnet20" and j == 0
                    continue
                assert parts.numel() == site.z[0].numel() and int(parts.max()) + 1 == opt.heads[b].parts
                active = site.active[0].flatten().nonzero().flatten()
                for k in active[torch.randint(len(active), (4,), generator=g)].tolist():
                    z = site.z.clone()
                    z.view(2, -1)[0, k] += 0.5
                    changed = (opt.local_losses(b, clean.tail(j, z, ALL), y)[0] != loss).nonzero().tolist()
                    own = int(parts.flatten()[k])
                    assert changed in ([[own, 0]], []), (b, j, k, own, changed)  # [] : the head ignores a tiny change
                    checked += bool(changed)
            h = clean.out
    assert checked >= 8, checked


def test_step_never_uses_autograd(monkeypatch):
    """No backpropagation anywhere: the step runs with autograd disabled and never calls into it."""

    def refusing(name):  # one function per patched name (torch._dynamo keys its rules by function)
        def refuse(*args, **kwargs):
            raise AssertionError(f"{name} was called during an ActivityZO step")

        return refuse

    import torch._dynamo  # noqa: F401  (builds its rule tables from the real functions before the patch)

    for owner, name in ((torch.autograd, "backward"), (torch.autograd, "grad"), (torch.Tensor, "backward")):
        monkeypatch.setattr(owner, name, refusing(name))
    torch.manual_seed(0)
    model = build_model("lenet").train()
    opt = ActivityZO(model, lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autograd.set_grad_enabled(False):
        loss = opt.step(*_batch(16))
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # every layer moved
    assert all(p.grad is not None and p.grad.grad_fn is None for p in model.parameters())


def _local_loss_gradient(model, opt, x, y, block_index: int) -> list[torch.Tensor]:
    """Autograd gradient of one block's local loss w.r.t. its layer (the block's input held fixed)."""
    blocks = opt.blocks
    with torch.no_grad():
        h = x
        for block in blocks[:block_index]:
            h = block.run(h).out
    block = blocks[block_index]
    layer = block.run(h).sites[0].layer
    with torch.enable_grad():
        loss = opt.local_losses(block_index, block.run(h).out, y)[0].sum(0).mean()
        return list(torch.autograd.grad(loss, list(layer.parameters())))


@pytest.mark.slow  # 300 averaged steps: a statistical check, not the edit loop's
def test_estimate_points_along_the_local_gradient():
    """The estimate is unbiased for each block's local gradient up to O(eps): averaged over 300 steps with
    lr 0 (weights fixed, new directions each step), its cosine with the autograd gradient of the same local
    loss is >= 0.7 for fc1 (a head's loss) and >= 0.85 for fc3 (the model's loss); measured 0.89 and 0.99.
    The conv layers are noisier and too slow to average here; benchmarks/zo_variance.py measures every
    layer, one step and averaged."""
    torch.manual_seed(0)
    model = build_model("lenet").train()
    opt = ActivityZO(model, lr=0.0, eps=1e-3, seed=3)
    x, y = _batch(32, seed=1)
    layers = {2: model.fc1, 4: model.fc3}
    totals = {k: torch.zeros(sum(p.numel() for p in layer.parameters())) for k, layer in layers.items()}
    steps = 300
    for _ in range(steps):
        opt.step(x, y)
        for k, layer in layers.items():
            totals[k] += torch.cat([p.grad.flatten() for p in layer.parameters()])
    for k, bound in ((2, 0.7), (4, 0.85)):
        truth = torch.cat([g.flatten() for g in _local_loss_gradient(model, opt, x, y, k)])
        cosine = F.cosine_similarity(totals[k] / steps, truth, dim=0).item()
        print(
            f"block {k}: cosine {cosine:.4f}, |estimate| {(totals[k] / steps).norm():.4g}, |truth| {truth.norm():.4g}"
        )
        assert cosine >= bound, (k, cosine)


def test_an_nhwc_batch_steps_like_a_contiguous_one():
    """A batch stored NHWC (as a loader may hand it over) gives non-contiguous conv outputs; the step makes
    its activities contiguous for the kernels and estimates the same gradients (same directions; within
    1e-3 of their scale: the convs sum in another order in NHWC, and the loss differences divide such a
    last-bit change by eps, as in the data-parallel test)."""
    x, y = _batch(4)
    grads = []
    for batch in (x, x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
        torch.manual_seed(0)
        model = build_model("localnet").train()
        ActivityZO(model, lr=1e-3, seed=2, patches=2, groups=2).step(batch, y)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-3 * a.abs().max(), ((a - b).abs().max(), a.abs().max())


def test_kernel_and_twin_steps_agree_bit_for_bit():
    """backend="triton" (the AdamW kernel and Philox signs; interpreted on CPU, compiled on CUDA) vs the
    torch twins, with per-part local losses."""
    x, y = (t.to(DEVICE) for t in _batch(2))
    weights = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = build_model("lenet").to(DEVICE).train()
        opt = ActivityZO(model, lr=1e-3, seed=5, backend=backend, example=x[:1], **PART_SETTINGS["lenet"])
        for _ in range(2):
            opt.step(x, y)
        weights[backend] = [p.detach().clone() for p in [*model.parameters(), *opt.heads.parameters()]]
    for a, b in zip(weights["triton"], weights["torch"]):
        assert torch.equal(a, b), (a - b).abs().max()


def test_q_linear_sets_the_directions_of_linear_sites_only():
    """A site's directions come from its own seed index and its k-th direction does not depend on how many
    there are, so with q=2, q_linear=3 the convs get exactly the estimates of a q=2 step and the linear
    layers those of a q=3 one (from the same weights: the first step's gradients, bit for bit)."""
    x, y = _batch(4)
    grads = {}
    for q, q_linear in ((2, 3), (2, 2), (3, 3)):
        torch.manual_seed(0)
        model = build_model("lenet").train()
        opt = ActivityZO(model, lr=1e-3, seed=6, q=q, q_linear=q_linear)
        opt.step(x, y)
        grads[q, q_linear] = {name: p.grad.clone() for name, p in model.named_parameters()}
        assert opt.forward_passes == 1 + max(q, q_linear)
    for name, g in grads[2, 3].items():
        expected = grads[3, 3] if name.startswith("fc") else grads[2, 2]
        assert torch.equal(g, expected[name]), name
        if name.startswith("fc"):
            assert not torch.equal(g, grads[2, 2][name]), name  # the third direction changed the estimate
    assert ActivityZO(build_model("lenet"), q=4).settings.q_linear == 4  # None: as many as q
    with pytest.raises(ValueError, match="q_linear"):
        ActivityZO(build_model("lenet"), q_linear=0)


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(q=2, **PART_SETTINGS["lenet"]), dict(q=2, q_linear=3)],
    ids=["default", "q2-parts", "q2-linear3"],
)
def test_state_dict_resume_is_bit_exact(settings):
    x1, y1 = _batch(32, seed=1)
    x2, y2 = _batch(32, seed=2)
    torch.manual_seed(0)
    model = build_model("lenet").train()
    opt = ActivityZO(model, lr=2e-3, seed=7, **settings)
    opt.step(x1, y1)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.step(x2, y2)
    opt.step(x1, y1)

    torch.manual_seed(123)  # a different init: everything must come from the saved state
    resumed = build_model("lenet").train()
    resumed.load_state_dict(saved_model)
    ropt = ActivityZO(resumed, lr=2e-3, seed=7, **settings)
    ropt.load_state_dict(saved_opt)
    ropt.step(x2, y2)
    ropt.step(x1, y1)
    for a, b in zip([*model.parameters(), *opt.heads.parameters()], [*resumed.parameters(), *ropt.heads.parameters()]):
        assert torch.equal(a, b)
    assert ropt.forward_passes == opt.forward_passes == 3 * (1 + max(settings.get("q", 1), ropt.settings.q_linear))

    other = ActivityZO(build_model("lenet"), lr=2e-3, eps=2e-2, seed=7)
    with pytest.raises(ValueError, match="saved with"):
        other.load_state_dict(saved_opt)
    older = copy.deepcopy(saved_opt)
    del older["subgrad"]["settings"]["patches"]
    with pytest.raises(ValueError, match=r"without the settings \['patches'\]"):
        ropt.load_state_dict(older)
    older = copy.deepcopy(saved_opt)
    del older["subgrad"]["settings"]["q_linear"]  # saved before q_linear existed: q on every layer
    if ropt.settings.q_linear == ropt.settings.q:
        ropt.load_state_dict(older)
    else:
        with pytest.raises(ValueError, match="saved with"):
            ropt.load_state_dict(older)


class _ThreadGather:
    """all_gather_examples for ranks simulated by threads of one process (what gloo does across processes)."""

    def __init__(self, world: int):
        self.slots, self.barrier, self.sent = [None] * world, threading.Barrier(world), [0] * world

    def for_rank(self, rank: int) -> "_ThreadRank":
        return _ThreadRank(self, rank)


class _ThreadRank:
    """One simulated rank: the Replicas an ActivityZO is given."""

    def __init__(self, group: _ThreadGather, rank: int):
        self.group, self.rank, self.world_size = group, rank, len(group.slots)

    def all_gather_examples(self, t):
        group = self.group
        group.slots[self.rank] = t.clone()
        group.sent[self.rank] += t.numel() * t.element_size()
        group.barrier.wait()
        out = torch.cat(group.slots, dim=-1)
        group.barrier.wait()  # every rank has read the slots before the next gather overwrites them
        return out


@pytest.mark.parametrize("name, parts", [("lenet", False), ("resnet20", False), ("lenet", True), ("resnet20", True)])
def test_data_parallel_exchanges_per_example_scalars_only(name, parts):
    """Two ranks, each running the perturbed tails of half the batch and gathering the loss differences,
    end with bit-identical replicas whose first gradient estimates equal one process's within 1e-3 of their
    scale: a tail on half a batch may sum in another order (a conv, or a CPU BLAS that picks its kernel by
    the number of rows: bit-identical on the AMD team VM, 1.9e-4 on an Intel one), and a last-bit change of
    a float32 loss near 2 is 2.4e-7, which the forward difference divides by eps = 1e-2.  Weights are not
    compared with the one process: Adam's first steps turn such a difference of a near-zero gradient into
    a step of +-lr.  What crosses between ranks per step: n/2 x (sites + heads) float32 values each, for a
    LeNet (5 sites, 4 heads) and a ResNet-20 (20 sites, 10 heads) alike, times the parts of each block's
    local loss where it has several: per example, never per weight."""
    x, y = _batch(8)
    settings = dict(lr=1e-3, seed=4, **(PART_SETTINGS[name] if parts else {}))
    torch.manual_seed(0)
    single = build_model(name).train()
    replicas = [copy.deepcopy(single) for _ in range(2)]
    torch.manual_seed(1)  # the heads' init, as every rank of a run draws it
    opt = ActivityZO(single, **settings)
    gather = _ThreadGather(2)
    opts = []
    for rank, model in enumerate(replicas):
        torch.manual_seed(1)
        opts.append(ActivityZO(model, replicas=gather.for_rank(rank), **settings))
    worst = 0.0
    for step in range(2):
        opt.step(x, y)
        threads = [threading.Thread(target=o.step, args=(x, y)) for o in opts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if step == 0:  # the first step's estimates, from the same weights
            pairs = [
                (p.grad, r.grad)
                for p, r in zip(opt.adamw.param_groups[0]["params"], opts[0].adamw.param_groups[0]["params"])
            ]
            worst = max(((g - h).abs().max() / g.abs().max().clamp_min(1e-30)).item() for g, h in pairs)
    a, b = replicas
    assert all(torch.equal(p, r) for p, r in zip(a.state_dict().values(), b.state_dict().values()))
    assert all(torch.equal(p, r) for p, r in zip(opts[0].heads.parameters(), opts[1].heads.parameters()))
    print(f"{name}: 2 ranks vs 1 process, largest gradient difference {worst:.3g} of the gradient's scale")
    assert worst <= 1e-3
    sites = {"lenet": 5, "resnet20": 20}[name]  # resnet20: stem, 2 per basic block, fc
    per_step = (8 // 2) * (sites + len(opt.heads)) * 4
    if parts:  # each block's differences are per part: its sites' and its head's
        per_step = (8 // 2) * 4 * (1 + sum((b.num_sites + 1) * h.parts for b, h in zip(opt.blocks, opt.heads)))
    assert gather.sent == [2 * per_step] * 2, (gather.sent, per_step)


class UserCNN(torch.nn.Module):
    """A model from outside subgrad that brings its own block cut (the BlockCut protocol)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))

    def local_blocks(self):
        return [PlainBlock(self.conv, "conv-flatten"), PlainBlock(self.fc, "logits")]


def test_a_user_model_brings_its_own_cut():
    """ActivityZO reads the cut through the protocol only: a user's model that implements it trains (its
    loss on a fixed batch falls), and one whose cut is malformed is refused with the reason."""
    torch.manual_seed(0)
    model = UserCNN()
    assert isinstance(model, BlockCut)
    opt = ActivityZO(model, lr=2e-3)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    losses = [float(opt.step(x, y)) for _ in range(30)]
    assert sum(losses[-5:]) < sum(losses[:5]), losses

    model.local_blocks = lambda: []
    with pytest.raises(ValueError, match="non-empty list of subgrad.optim.activity_blocks.LocalBlock"):
        ActivityZO(model)


def test_bad_settings_are_refused():
    model = build_model("lenet")
    with pytest.raises(ValueError, match="eps"):
        ActivityZO(model, eps=0.0)
    with pytest.raises(ValueError, match=r"output must be logits \(batch, classes\)"):
        ActivityZO(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="q must be"):
        ActivityZO(model, q=0)
    with pytest.raises(ValueError, match="training mode"):
        ActivityZO(model.eval()).step(*_batch(2))
    with pytest.raises(ValueError, match=r"patches=4 does not cut a 14x14 block output evenly; use \[1, 2, 7, 14\]"):
        ActivityZO(model, patches=4)
    with pytest.raises(ValueError, match="groups=4 must divide the 6 channels"):
        ActivityZO(model, groups=4)
    for name, value in (("patches", 0), ("groups", 1.5), ("norm", 1)):
        with pytest.raises(ValueError, match=name):
            ActivityZO(model, **{name: value})


def test_non_finite_estimate_skips_the_update():
    """A NaN input makes every loss difference NaN: no update, the step counted as skipped, one warning
    when the count is read."""
    torch.manual_seed(0)
    model = build_model("lenet").train()
    opt = ActivityZO(model, lr=1e-3)
    x, y = _batch(4)
    x[0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(x, y)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):  # decided on the device, read when asked
        assert opt.skipped_steps == 1 and opt.step_count == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.step(*_batch(4))  # a finite batch updates again
    assert opt.skipped_steps == 1 and not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (8, 4, 5, 5), (3, 16, 7, 9)])  # BatchNorm needs 2 values a channel
def test_through_batch_stats_is_batchnorm_backward(shape, dtype, tol):
    """A gradient with the batch statistics held fixed, carried through them in closed form, equals autograd
    through training-mode BatchNorm (relative to the gradient's scale; float64 to rounding, float32 to 1e-5)."""
    g = torch.Generator().manual_seed(sum(shape))
    z = torch.randn(shape, generator=g, dtype=dtype) * 3 + 1
    w = torch.randn(shape, generator=g, dtype=dtype)
    bn = torch.nn.BatchNorm2d(shape[1]).to(dtype).train()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(shape[1], generator=g, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.randn(shape[1], generator=g, dtype=dtype))
    stats = (z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False))
    zt = z.clone().requires_grad_()
    (F.relu(bn(zt)) * w).sum().backward()
    zf = z.clone().requires_grad_()
    (F.relu(F.batch_norm(zf, stats[0], stats[1], bn.weight, bn.bias, False, 0.0, bn.eps)) * w).sum().backward()
    carried = through_batch_stats(bn, z, stats)(zf.grad.clone())  # it writes over its input
    scale = zt.grad.abs().max().clamp_min(1.0)
    err = (carried - zt.grad).abs().max() / scale
    fixed_err = (zf.grad - zt.grad).abs().max() / scale
    print(f"max |carried - autograd| / scale = {err:.3g} (the fixed-statistics gradient: {fixed_err:.3g})")
    assert err <= tol


@pytest.mark.parametrize("name", ["lenet", "resnet20", "localnet"])
def test_batchnorm_sites_carry_their_estimate_through_the_statistics(name):
    """Every ResNet-20 site is normalised by BatchNorm and carries its estimate through the statistics;
    LeNet and LocalNet have no BatchNorm, so the setting cannot change their steps."""
    x, y = _batch(4)
    h, flags = x, []
    with torch.no_grad():
        for block in local_blocks(build_model(name).train()):
            record = block.run(h)
            flags += [site.through_stats is not None for site in record.sites]
            h = record.out
    assert all(flags[:-1]) if name == "resnet20" else not any(flags), flags
    grads = {}
    for through in (True, False):
        torch.manual_seed(0)
        model = build_model(name).train()
        opt = ActivityZO(model, lr=1e-3, seed=4, through_batch_stats=through)
        opt.step(x, y)
        grads[through] = [p.grad for p in model.parameters() if p.grad is not None]
    same = all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))
    assert same == (name != "resnet20")
    # a state saved before the setting existed held the statistics fixed: refused where that differs
    older = copy.deepcopy(opt.state_dict())
    del older["subgrad"]["settings"]["through_batch_stats"]
    current = ActivityZO(model, lr=1e-3, seed=4)
    if name == "resnet20":
        with pytest.raises(ValueError, match="through_batch_stats=False"):
            current.load_state_dict(older)
    else:
        current.load_state_dict(older)


@pytest.mark.parametrize("name", ["lenet", "resnet20", "localnet"])
def test_working_in_chunks_changes_memory_not_the_step(monkeypatch, name):
    """A chunk of one example (perturbed passes, head features, weight-gradient products, the twin's
    gradient) gives the step of the whole batch at once.  The twin's chunks are exact.  A convolution of one
    example may round differently from the batch's, and a loss difference divides that rounding by eps
    (1e-2): d moves by ~1e-5 of the loss, so the bound is 1e-3 of each gradient's largest entry."""
    import subgrad.kernels.activity as kernel_activity
    from subgrad.optim import activity_chunks

    def grads(chunk_bytes, inplace_chunk):
        monkeypatch.setattr(activity_chunks, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(kernel_activity, "INPLACE_CHUNK", inplace_chunk)
        torch.manual_seed(0)
        model = build_model(name).train()
        opt = ActivityZO(model, lr=0.0, seed=3)
        x, y = _batch(6)
        loss = opt.step(x, y)
        return loss, [p.grad.clone() for p in opt.adamw.param_groups[0]["params"]]

    whole_loss, whole = grads(2**40, 2**40)
    chunked_loss, chunked = grads(1, 1)
    assert torch.equal(whole_loss, chunked_loss)
    for i, (a, b) in enumerate(zip(whole, chunked)):
        diff, scale = float((a - b).abs().max()), float(a.abs().max())
        assert diff <= 1e-3 * scale, f"param {i}: max diff {diff:.3g}, largest entry {scale:.3g}"
    _, twin_chunked = grads(2**40, 1)  # the twin alone: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(whole, twin_chunked))
