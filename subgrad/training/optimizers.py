"""The optimizers ``subgrad train`` offers, one entry each: how to build it from a :class:`TrainConfig`, how a
training step drives it, which settings it reads, and its defaults per model.  Adding an optimizer to the
trainer is adding an entry here (and its class in :mod:`subgrad.optim`).

torch is imported by the builders only: the CLI's ``--help`` reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

#: How the training step drives an optimizer: ``backprop`` (loss.backward(), then step()), ``closure`` (the
#: step evaluates a loss closure: shared-direction finite differences), ``blocks`` (``step(x, y)``: the
#: optimizer runs the model itself, block by block).
STEP_KINDS = ("backprop", "closure", "blocks")

#: The TrainConfig fields that belong to an optimizer.  An entry names those it reads; giving it any other is
#: an error, never silently ignored.
OPTIMIZER_SETTINGS = (
    "momentum",
    "weight_decay",
    "eps",
    "q",
    "q_linear",
    "estimator",
    "distribution",
    "blocks",
    "clip",
    "scale_by_block_size",
    "patches",
    "groups",
    "norm",
)
_ESTIMATE = ("weight_decay", "eps", "q", "estimator", "distribution", "blocks", "clip", "scale_by_block_size")


@dataclass(frozen=True)
class TrainerOptimizer:
    name: str
    summary: str  # one line for --help
    step_kind: str  # one of STEP_KINDS
    settings: tuple[str, ...]  # the OPTIMIZER_SETTINGS it reads
    build: Callable  # (resolved config, model, replicas or None) -> the optimizer
    defaults: dict[str, dict] = field(repr=False)  # model name -> that model's row of settings
    amp: bool = True  # False: its step runs in float32 and --amp is refused

    def unused(self) -> tuple[str, ...]:
        return tuple(s for s in OPTIMIZER_SETTINGS if s not in self.settings)


def _build_sgd(cfg, model, replicas):
    from ..optim import SGD

    return SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, replicas=replicas)


def _build_adamw(cfg, model, replicas):
    from ..optim import AdamW

    # capturable: the step count lives on the device, so the trainer's step can be a CUDA graph
    return AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=True, replicas=replicas)


def _estimate_settings(cfg, replicas) -> dict:
    return dict(
        lr=cfg.lr,
        eps=cfg.eps,
        q=cfg.q,
        distribution=cfg.distribution,
        blocks=cfg.blocks,
        clip=cfg.clip,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        scale_by_block_size=cfg.scale_by_block_size,
        replicas=replicas,
    )


def _build_zo_sgd(cfg, model, replicas):
    from ..optim import ZOSGD

    return ZOSGD(
        model.named_parameters(), estimator=cfg.estimator, momentum=cfg.momentum, **_estimate_settings(cfg, replicas)
    )


def _build_zo_adam(cfg, model, replicas):
    from ..optim import ZOAdam

    return ZOAdam(model.named_parameters(), estimator=cfg.estimator, **_estimate_settings(cfg, replicas))


def _build_hizoo(cfg, model, replicas):
    from ..optim import HiZOO

    return HiZOO(model.named_parameters(), momentum=cfg.momentum, **_estimate_settings(cfg, replicas))


def _build_activity_zo(cfg, model, replicas):
    from ..optim import ActivityZO

    return ActivityZO(
        model,
        lr=cfg.lr,
        eps=cfg.eps,
        q=cfg.q,
        q_linear=cfg.q_linear,
        patches=cfg.patches,
        groups=cfg.groups,
        norm=cfg.norm,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        replicas=replicas,
    )


# -- defaults per model ------------------------------------------------------------------------------
# Each row is what `subgrad train --model M --optimizer O` uses when a flag is not given; settings a row
# leaves out take config.COMMON_DEFAULTS.  "generic" (model_names.GENERIC_ROW) serves every model without a
# row of its own (torchvision's and the user's).  benchmarks/README.md states the accuracy each reaches.

# activity perturbation with local losses (subgrad.optim.ActivityZO); settings chosen on a 5,000-image
# validation split of the training set (--validation 5000; benchmarks/README.md "Why zo's defaults", the
# runs by date in benchmarks/LOG.md):
# lenet q 8 on the convs, q_linear 16 on the fc layers, 9,000 steps (validation, mean of seeds 0-2: 58.6%,
# ahead on every seed of q 8 x 7,500 steps, 57.6%, and of q 8 x 9,000 or 10,000, 57.8% / 57.5%; q_linear
# 32 x 9,000: 58.4% at 1.2x the time; patch and group losses lower lenet's accuracy); resnet20: 4 x 4
# patches x 4 groups (300-step validation runs: 18.6% vs 12.7% with one loss per block), 6,000 steps so
# that the 1.3x costlier step stays inside the hour; its estimates carried through BatchNorm's batch
# statistics (ActivityZO's through_batch_stats; 1,000-step validation runs: 27.5% vs 25.6% held fixed).
# localnet: q 2, 4 x 4 patches, 4 groups (1,500-step validation runs, benchmarks/LOG.md); lr 1e-3, not
# those runs' 2e-3: Adam's steps on noisy estimates random-walk the weights by ~ lr sqrt(steps), and at
# 2e-3 a 25,000-step run's test loss rose past chance (3.5) by step 4,000; 22,000 steps: 43 min on the
# 2-core Intel Xeon VM, 29 min on the AMD EPYC one (benchmarks/LOG.md)
_ACTIVITY = dict(batch_size=128, lr=2e-3, eps=1e-2, norm=False, schedule="cosine", augment=False)
ZO_DEFAULTS = {
    # every other model (torchvision's, the user's): one local loss per block (patches need maps that divide
    # evenly), q 2; not yet chosen by a measurement on such models
    "generic": dict(_ACTIVITY, q=2, patches=1, groups=1, steps=6000),
    "lenet": dict(_ACTIVITY, q=8, q_linear=16, patches=1, groups=1, steps=9000),
    "resnet20": dict(_ACTIVITY, q=1, patches=4, groups=4, steps=6000),
    "localnet": dict(_ACTIVITY, lr=1e-3, q=2, patches=4, groups=4, steps=22000),
}
# localnet is built for --optimizer zo: its first-order rows are the backprop comparison on the same model,
# its shared-direction rows are resnet20's (not tuned for it)
_ONECYCLE = dict(batch_size=128, weight_decay=5e-4, schedule="onecycle")
SGD_DEFAULTS = {
    "generic": dict(_ONECYCLE, lr=0.05, momentum=0.9, epochs=15),
    "lenet": dict(_ONECYCLE, lr=0.05, momentum=0.9, epochs=15),
    "resnet20": dict(_ONECYCLE, lr=0.1, momentum=0.9, epochs=30),
    "localnet": dict(_ONECYCLE, lr=0.05, momentum=0.9, epochs=15),
}
ADAMW_DEFAULTS = {
    "generic": dict(_ONECYCLE, lr=2e-3, epochs=15),
    "lenet": dict(_ONECYCLE, lr=3e-3, epochs=15),
    "resnet20": dict(_ONECYCLE, lr=2e-3, epochs=30),
    "localnet": dict(_ONECYCLE, lr=2e-3, epochs=15),
}
_SHARED = dict(eps=1e-3, q=1, schedule="cosine", augment=False)
_RESNET_ZO_SGD = dict(_SHARED, batch_size=256, lr=5e-3, momentum=0.9, steps=6000)
_RESNET_ZO_ADAM = dict(_SHARED, batch_size=256, lr=5e-4, steps=6000)
_RESNET_HIZOO = dict(_SHARED, batch_size=256, lr=5e-3, eps=1e-2, steps=4000)
ZO_SGD_DEFAULTS = {
    # 1,200 steps x 5 module blocks x 2 = 12,000 forward passes of batch 512 (see README for the figure)
    "lenet": dict(_SHARED, batch_size=512, lr=1e-3, blocks="module", scale_by_block_size=True, clip=0.2, steps=1200),
    "resnet20": _RESNET_ZO_SGD,
    "localnet": _RESNET_ZO_SGD,
    "generic": _RESNET_ZO_SGD,
}
ZO_ADAM_DEFAULTS = {
    # forward differences share L0 across q = 4 directions: 2,400 steps x 5 = 12,000 forward passes;
    # Rademacher directions: 34.3% vs 33.9% gaussian (new direction map), and 5x cheaper to generate on CPU
    "lenet": dict(_SHARED, batch_size=512, lr=2e-3, q=4, estimator="forward", distribution="rademacher", steps=2400),
    "resnet20": _RESNET_ZO_ADAM,
    "localnet": _RESNET_ZO_ADAM,
    "generic": _RESNET_ZO_ADAM,
}
HIZOO_DEFAULTS = {
    "lenet": dict(_SHARED, batch_size=512, lr=2e-2, eps=1e-2, steps=4000),
    "resnet20": _RESNET_HIZOO,
    "localnet": _RESNET_HIZOO,
    "generic": _RESNET_HIZOO,
}

REGISTRY: dict[str, TrainerOptimizer] = {
    entry.name: entry
    for entry in (
        TrainerOptimizer(
            "sgd", "SGD, fused kernel", "backprop", ("momentum", "weight_decay"), _build_sgd, SGD_DEFAULTS
        ),
        TrainerOptimizer("adamw", "AdamW, fused kernel", "backprop", ("weight_decay",), _build_adamw, ADAMW_DEFAULTS),
        TrainerOptimizer(
            "zo",
            "forward-only: per-example activity perturbation with local losses (ActivityZO)",
            "blocks",
            ("weight_decay", "eps", "q", "q_linear", "patches", "groups", "norm"),
            _build_activity_zo,
            ZO_DEFAULTS,
            amp=False,
        ),
        TrainerOptimizer(
            "zo-sgd",
            "forward-only: finite-difference SGD (ZOSGD)",
            "closure",
            ("momentum", *_ESTIMATE),
            _build_zo_sgd,
            ZO_SGD_DEFAULTS,
        ),
        TrainerOptimizer(
            "zo-adam",
            "forward-only: Adam on finite differences (ZOAdam)",
            "closure",
            _ESTIMATE,
            _build_zo_adam,
            ZO_ADAM_DEFAULTS,
        ),
        TrainerOptimizer(
            "hizoo",
            "forward-only: finite differences preconditioned by curvature (HiZOO)",
            "closure",
            ("momentum", *(s for s in _ESTIMATE if s != "estimator")),
            _build_hizoo,
            HIZOO_DEFAULTS,
        ),
    )
}
OPTIMIZERS = tuple(REGISTRY)
#: forward-only: every optimizer whose step takes no backward pass
ZO_OPTIMIZERS = tuple(name for name, entry in REGISTRY.items() if entry.step_kind != "backprop")
