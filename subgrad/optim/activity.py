"""ActivityZO: forward-only training by per-example activity perturbation with local losses.

``subgrad train --optimizer zo``.  After Ren, Kornblith, Liao and Hinton (2022), "Scaling forward
gradient with local losses".  The model is cut into blocks (:mod:`.activity_blocks`; a model without a cut
of its own is traced, :mod:`.activity_graph`), each trained on its own loss: the mean over its *parts* of
the cross-entropy of a training-only linear head per part (``LocalHead``: the block output cut into
patches x channel groups; one part by default), the last on the model's output.
At step ``t``, autograd off, for each block in order (its input is the previous block's output)::

    clean pass     x_j, z_j = input and activity of site j (a conv/linear layer's output, or its pooled
                   output), L_pi = local loss of part p of example i
    for site j, q_j times (k):        q_j = q on a convolution, q_linear on a linear layer
                   u_k = r_k * active_j             r_k: a Rademacher sign per unit of every example, from
                                                    the Philox seed s_t + site (0 on units a ReLU switches off)
                   d_kpi = (L_pi(tail_j(z_j + eps u_k)) - L_pi) / eps     one perturbed pass of the tail
                   g_j[i, unit] = sum over k of d_k,part(unit),i u_k[i, unit] / (q_j n)
                                                    estimates d(mean_i sum_p L_pi)/dz_j: a unit's product is
                                                    with the loss of the part it moves only (the other parts'
                                                    units add no noise to it); a site BatchNorm normalises:
                                                    carried through the batch statistics the tails hold
                                                    fixed (activity_blocks.through_batch_stats)
                   grad W_j = g_j^T x_j (linear; for a conv its weight-gradient product), grad b_j = sum g_j
    for the head:  the same with a perturbation of its logits
    then one fused AdamW step (subgrad.optim.AdamW, capturable: a Triton kernel, one launch per flat
    buffer; the bit-identical torch twin on CPU) over the model's layers and the heads.

The perturbed activity and ``g_j`` are one fused kernel each (:mod:`subgrad.kernels.activity`): the q
directions are regenerated from the seed where they are used, never stored.  The step never reads a
device value on the host: the seed comes from a step counter on the device, and a non-finite loss
difference closes the AdamW kernel's gate on the device (the step is counted in ``skipped_steps``, read
when asked), so the whole step can be captured in a CUDA graph.

Each example has its own direction, so the estimate's variance is divided by the batch; perturbing
activities rather than weights divides it further by the layer's fan-in; the local losses keep each
estimate to one block, and parts to the units of one part.  A step is one clean forward pass and
max(q, q_linear) perturbed passes (counted as 1 + max(q, q_linear) forward passes: perturbed pass k reruns
the tails of the sites with more than k directions; a ResNet-20 basic block's tails rerun 1.5 blocks).
A linear layer's activity has few units (LeNet's fc1: 120 per example, conv1: 1,176) and a cheap tail, so
more directions there buy a better estimate cheaply (``q_linear``).

Memory beyond inference: one block's activations at a time (its sites' activities and what its tails
read; one perturbed tail at a time, on CPU for 16 MiB of examples at a time: :mod:`.activity_chunks`), the
heads (LeNet: 5,600 parameters at one part per block), a gradient buffer and Adam's two moments (3 x 4
bytes per trained parameter, model and heads).  Measured: benchmarks/README.md, "Memory of a training step".

Data parallel, scalars only: every rank runs the clean pass of every block on the whole global batch
(so BatchNorm sees the global batch, as one process would), and runs the perturbed tails for its own
contiguous share of the examples only.  Per block, one all-gather of the per-example loss differences d
(``n x parts x (sum of the sites' q_j + 1)`` float32 values: per example, part, site and direction, never
per weight) gives every rank all of them; each rank then forms the same weight gradients ``g^T x`` from its
own clean activations and applies the same update, so replicas stay bit-identical without a weight or a
gradient on the wire.  The price: the clean pass and the products are not divided among ranks, only the
tails are (measured in benchmarks/README.md, "Data parallel").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels as K
from ._counters import StepCounters
from .activity_blocks import trained_parameters
from .activity_chunks import example_slices, set_weight_grad
from .activity_graph import block_cut
from .activity_heads import make_heads
from .first_order import AdamW
from .replicas import Replicas
from .zo_settings import require


@dataclass(frozen=True)
class ActivitySettings:
    """What shapes the estimate (fixed for a run; saved with the state and checked on load)."""

    eps: float = 1e-2
    q: int = 1
    q_linear: int | None = None  # directions on a linear layer's activity; None: q
    head_pool: int = 4
    patches: int = 1
    groups: int = 1
    norm: bool = False
    through_batch_stats: bool = True
    seed: int = 0

    def __post_init__(self):
        def positive_int(value):
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        for name in ("q", "head_pool", "patches", "groups"):
            require(name, positive_int(getattr(self, name)), "an int >= 1", getattr(self, name))
        require("q_linear", self.q_linear is None or positive_int(self.q_linear), "None or an int >= 1", self.q_linear)
        if self.q_linear is None:  # one spelling of "as many as q", so saved and new settings compare equal
            object.__setattr__(self, "q_linear", self.q)
        require("eps", isinstance(self.eps, (int, float)) and self.eps > 0, "a number > 0", self.eps)
        for name in ("norm", "through_batch_stats"):
            require(name, isinstance(getattr(self, name), bool), "a bool", getattr(self, name))
        require("seed", isinstance(self.seed, int) and 0 <= self.seed < 2**62, "an int in [0, 2**62)", self.seed)

    def site_q(self, layer: nn.Module) -> int:
        """Directions per step on the activity of a site's ``layer``: q_linear on a linear layer, else q."""
        return self.q_linear if isinstance(layer, nn.Linear) else self.q


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _flat(parts: torch.Tensor | None) -> torch.Tensor | None:
    """A part map flattened to one entry per unit; None where every unit moves the one part (or all)."""
    return None if parts is None or int(parts.max()) == 0 else parts.reshape(-1).contiguous()


class ActivityZO:
    """Forward-only training by per-example activity perturbation with local losses (see the module
    docstring for the estimate).

    Unlike a ``torch.optim`` optimizer it runs the model itself, block by block:
    ``loss = opt.step(inputs, targets)`` returns the mean loss of the model's output on the batch.

    Args:
        model: any network of Conv2d and Linear layers that torch.fx traces (in train mode when stepping;
            norms' scale and shift are not trained by this method), cut into blocks by :func:`.block_cut`.
        cut: the blocks, when the model is not to be cut as :func:`.block_cut` would (a list of
            :class:`.activity_blocks.LocalBlock`).
        lr, betas, weight_decay: of the AdamW update (decoupled weight decay).
        eps: activity perturbation size (finite-difference step on each unit's output).
        q: directions per step on each convolution's activity.
        q_linear: directions per step on each linear layer's activity (None: q).
        head_pool: a head reads each patch of a convolutional block's output average-pooled to
            head_pool x head_pool (at most the patch's size).
        patches, groups, norm: the local losses' parts (:class:`.activity_heads.LocalHead`): each block's
            output cut into patches x patches patches (convolutional blocks) and ``groups`` channel groups, each part
            with its own head and loss; ``norm`` standardises each part's features before its head.
        through_batch_stats: estimate the gradient of a BatchNorm'd site through the batch statistics, as
            backprop in training mode has it (:func:`.activity_blocks.through_batch_stats`); False: with them
            held fixed, as the tails measure it (a different gradient; no effect on a model without
            BatchNorm).
        seed: names the run's sequence of directions.
        backend: kernel backend of the activity kernels and the update (None: Triton on CUDA, the twin
            elsewhere).
        example: a batch of inputs (only its shape and device matter) to size the heads; default: one
            CIFAR-sized image on the model's device.
        replicas: data-parallel ranks (:class:`subgrad.optim.replicas.Replicas`); None: one process.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 2e-3,
        eps: float = ActivitySettings.eps,
        q: int = ActivitySettings.q,
        q_linear: int | None = ActivitySettings.q_linear,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        head_pool: int = ActivitySettings.head_pool,
        patches: int = ActivitySettings.patches,
        groups: int = ActivitySettings.groups,
        norm: bool = ActivitySettings.norm,
        through_batch_stats: bool = ActivitySettings.through_batch_stats,
        seed: int = ActivitySettings.seed,
        backend: str | None = None,
        example: torch.Tensor | None = None,
        replicas: Replicas | None = None,
        cut: list | None = None,
    ):
        self.settings = settings = ActivitySettings(
            eps=eps,
            q=q,
            q_linear=q_linear,
            head_pool=head_pool,
            patches=patches,
            groups=groups,
            norm=norm,
            through_batch_stats=through_batch_stats,
            seed=seed,
        )
        self.model = model
        self.blocks = block_cut(model, cut)
        device = next(model.parameters()).device
        example = torch.zeros(1, 3, 32, 32, device=device) if example is None else example
        heads = dict(patches=settings.patches, groups=settings.groups, pool=settings.head_pool, norm=settings.norm)
        self.heads = make_heads(self.blocks, example, **heads)  # training only: saved with the optimizer, not exported
        # per block and site: the head part each unit of one example moves, flat (None: the whole loss); per
        # head: the part of each of its logits
        self.site_parts = [
            [_flat(block.site_parts(j, head.part_map().to(device))) for j in range(block.num_sites)]
            for block, head in zip(self.blocks, self.heads)
        ] + [[None] * self.blocks[-1].num_sites]
        classes = self.heads[0].weight.shape[-1] if len(self.heads) else 0
        self.head_parts = [
            torch.arange(head.parts, device=device).repeat_interleave(classes) if head.parts > 1 else None
            for head in self.heads
        ]
        # capturable: the step count and bias corrections live on the device, where the skip gate acts
        self.adamw = AdamW(
            trained_parameters(self.blocks) + list(self.heads.parameters()),
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            capturable=True,
            backend=backend,
        )
        self.counters = StepCounters(type(self).__name__).on(device)
        #: data-parallel ranks: each runs the perturbed passes of its share of the batch, and the per-example
        #: differences are gathered from all (None: one process)
        self.replicas = replicas

    # torch.optim-like surface used by training: lr schedules
    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups

    @property
    def step_count(self) -> int:
        """Steps taken (read from the device counter)."""
        return self.counters.steps_taken()

    @property
    def skipped_steps(self) -> int:
        """Steps whose estimate was not finite, so no update was applied (read from the device; warns the
        first time any are seen).  The weights are never perturbed, so nothing needs restoring."""
        return self.counters.skipped_steps()

    @property
    def forward_passes(self) -> int:
        """Forward passes so far: per step one clean pass and max(q, q_linear) perturbed ones (perturbed pass
        k reruns the tails of the sites with more than k directions: counted as one forward pass)."""
        return (1 + max(self.settings.q, self.settings.q_linear)) * self.step_count

    def _signs(self, seed: torch.Tensor, q: int, z: torch.Tensor, site: int) -> torch.Tensor | None:
        """A site's q directions drawn once, for the twins (the CPU path), which read them for the perturbed
        passes and the gradient; None where the Triton kernels run (they regenerate them, never stored)."""
        if not K.takes_twin(self.adamw.backend, z):
            return None
        return K.site_signs(seed, q, z.numel(), z.device, site)

    def _rows(self, n: int) -> slice:
        """This rank's contiguous share of a batch of ``n`` examples (the perturbed tails it runs)."""
        rank, world = (self.replicas.rank, self.replicas.world_size) if self.replicas is not None else (0, 1)
        if n % world:
            raise ValueError(f"the batch ({n}) must divide evenly among the {world} data-parallel ranks")
        return slice(rank * n // world, (rank + 1) * n // world)

    def local_losses(self, b: int, out: torch.Tensor, y: torch.Tensor):
        """Block ``b``'s local losses on its output ``out`` (labels ``y``): ``(parts, n)``, each part's
        cross-entropy over the number of parts, so they sum to the block's loss; and the head's features and
        logits ``(parts, n, classes)`` (the last block: no features, its output as logits)."""
        if b == len(self.blocks) - 1:
            return F.cross_entropy(out, y, reduction="none")[None], None, out[None]
        head = self.heads[b]
        features = head.features(self.blocks[b].head_input(out))
        logits = head(features)
        return self._losses(logits, y), features, logits

    @staticmethod
    def _losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts, n = logits.shape[:2]
        if parts == 1:
            return F.cross_entropy(logits[0], y, reduction="none")[None]
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(parts), reduction="none").view(parts, n) / parts

    @torch.no_grad()
    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One step on the (global) batch ``(inputs, targets)``; returns the mean loss of the model's output."""
        if not self.model.training:  # BatchNorm: the clean pass would use running statistics, the tails batch ones
            raise ValueError("ActivityZO.step needs the model in training mode; call model.train() first")
        self.adamw.zero_grad(set_to_none=True)  # the step sets every gradient: the last step's are not held
        seed = self.counters.on(inputs.device).advance(self.settings.seed, self.adamw.backend)
        finite = torch.ones((), dtype=torch.bool, device=inputs.device)
        h, site, rows = inputs, 0, self._rows(inputs.shape[0])
        for b in range(len(self.blocks)):
            # one block at a time: what a block's step leaves is its output (the next block's input), the
            # gradients it set and its loss; its activations die with the call
            h, loss, site = self._block_step(b, h, targets, seed, site, rows, finite)
        self.counters.count_skip(finite)
        # one fused kernel per flat buffer (model layers and heads); a NaN/inf estimate closes its gate on
        # the device, so it never reaches Adam's moments
        self.adamw._step(gate=finite.reshape(1))
        return loss.sum(0).mean()

    def _block_step(self, b, h, targets, seed, site, rows, finite):
        """Block ``b``'s estimate from its input ``h``: sets its layers' and head's gradients, clears
        ``finite`` where a loss difference is not; returns (its output, its losses, the next site's index)."""
        eps, backend, trusted = self.settings.eps, self.adamw.backend, dict(validate_args=False)
        block, site_parts = self.blocks[b], self.site_parts[b]
        head = self.heads[b] if b < len(self.blocks) - 1 else None
        clean = block.run(h)
        del h  # the caller's reference is the one that lives on (a site's input holds it where needed)
        loss, features, logits = self.local_losses(b, clean.out, targets)  # (parts, n)
        # the kernels walk activities in their logical order: an input in another memory format (an NHWC
        # batch) gives conv outputs that are not contiguous
        sites = [dataclasses.replace(rec, z=rec.z.contiguous(), active=_contiguous(rec.active)) for rec in clean.sites]
        clean.sites.clear()  # held once, in ``sites``, so each site's tensors go with its gradient
        # 1. this rank's rows of every perturbed pass: d (per part and example) for each site and direction
        qs = [self.settings.site_q(rec.layer) for rec in sites]
        first = [sum(qs[:j]) for j in range(len(sites))]  # site j's rows of d: first[j] + k
        diffs, signs = [], [self._signs(seed, qs[j], rec.z, site + j) for j, rec in enumerate(sites)]
        for j, rec in enumerate(sites):
            for k in range(qs[j]):  # a unit that cannot move the loss (not active) gets no noise
                per_chunk = []
                for chunk in example_slices(rec.z, rows):
                    zp = K.perturb_activity(
                        rec.z, rec.active, seed, k, chunk, eps, backend, seed_index=site + j, signs=signs[j], **trusted
                    )
                    zp = [zp]  # handed to the tail, which owns it (BlockPass) and may free it before it returns
                    out = clean.tail(j, zp.pop(), chunk)
                    per_chunk.append((self.local_losses(b, out, targets[chunk])[0] - loss[:, chunk]) / eps)
                    del out
                diffs.append(per_chunk[0] if len(per_chunk) == 1 else torch.cat(per_chunk, dim=1))
        head_site = site + len(sites)
        if head is not None:  # the head, from a perturbation of its logits ([n, parts, classes] per example)
            per_example = logits.transpose(0, 1).contiguous()
            head_signs = self._signs(seed, 1, per_example, head_site)
            vp = K.perturb_activity(
                per_example, None, seed, 0, rows, eps, backend, seed_index=head_site, signs=head_signs, **trusted
            )
            diffs.append((self._losses(vp.transpose(0, 1), targets[rows]) - loss[:, rows]) / eps)
        # 2. every rank's d: the only data-parallel traffic (per example, part and site, never per weight)
        d = torch.stack(diffs)
        if self.replicas is not None:
            d = self.replicas.all_gather_examples(d)
        finite &= torch.isfinite(d).all()
        # 3. the same gradients on every rank, from the clean activations of the whole batch, the
        # directions regenerated from their seed; each site's activity is dropped once its gradient is set
        for j in range(len(sites)):
            rec, sites[j] = sites[j], None
            parts = site_parts[j]
            dj = d[first[j] : first[j] + qs[j]]
            if parts is None and dj.shape[1] > 1:  # the site moves every part: the block's whole loss
                dj = dj.sum(1, keepdim=True)
            g = K.activity_gradient(
                dj, rec.active, parts, seed, rec.z.shape, backend, seed_index=site + j, signs=signs[j], **trusted
            )
            signs[j] = None
            if rec.through_stats is not None and self.settings.through_batch_stats:
                g = rec.through_stats(g)
            layer, x = rec.layer, rec.x() if callable(rec.x) else rec.x
            g = g if rec.unpool is None else rec.unpool(g)
            del rec  # its activity and mask: not needed for the product
            set_weight_grad(layer, x, g)
            del x, g
        if head is not None:
            g = K.activity_gradient(
                d[-1:],
                None,
                self.head_parts[b],
                seed,
                per_example.shape,
                backend,
                seed_index=head_site,
                signs=head_signs,
                **trusted,
            )
            head.set_grad(features, g.transpose(0, 1))
        return clean.out, loss, site + len(sites) + (head is not None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        """AdamW's state, the heads, the step counter and the settings (so a resume draws the same directions)."""
        steps, skipped = self.counters.values()
        return dict(
            adamw=self.adamw.state_dict(),
            heads=self.heads.state_dict(),
            subgrad=dict(
                kind=type(self).__name__, step=steps, skipped=skipped, settings=dataclasses.asdict(self.settings)
            ),
        )

    def load_state_dict(self, state_dict: dict) -> None:
        meta = state_dict.get("subgrad", {})
        if meta.get("kind") != type(self).__name__:
            raise ValueError(f"optimizer state is from {meta.get('kind')!r}, not {type(self).__name__}")
        # a state saved before q_linear existed used q on every layer: its missing q_linear means just that;
        # one saved before through_batch_stats held the statistics fixed, which only BatchNorm'd sites notice
        settings = dict(meta["settings"])
        if "through_batch_stats" not in settings:
            has_bn = any(isinstance(m, nn.BatchNorm2d) for m in self.model.modules())
            settings["through_batch_stats"] = False if has_bn else self.settings.through_batch_stats
        missing = {f.name for f in dataclasses.fields(ActivitySettings)} - set(settings) - {"q_linear"}
        if missing:
            raise ValueError(
                f"optimizer state was saved by a subgrad without the settings {sorted(missing)}; "
                "its local losses differ from this one's: start a new run"
            )
        saved = ActivitySettings(**settings)
        if saved != self.settings:
            raise ValueError(
                f"optimizer state was saved with {saved}, this optimizer has {self.settings}; "
                "resume with the run's own settings"
            )
        self.heads.load_state_dict(state_dict["heads"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.counters.load(int(meta["step"]), int(meta.get("skipped", 0)))
