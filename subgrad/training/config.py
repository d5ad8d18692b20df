"""Training settings in one place: the defaults table, :class:`TrainConfig`, and the command-line flags
that ``subgrad train`` and ``subgrad run`` generate from it.

Each setting is one :class:`TrainConfig` field, documented once (its ``help``).  ``None`` always means
"the default for this model/optimizer pair": :data:`DEFAULTS` for the pair, else :data:`COMMON_DEFAULTS`.
A setting that can be off says so with a value (``clip="off"``, ``blocks="none"``) or is a boolean flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

MODEL_NAMES = ("lenet", "resnet20", "localnet")  # subgrad.models.MODELS, named here so the CLI needs no torch import
ESTIMATOR_OPTIMIZERS = ("zo-sgd", "zo-adam", "hizoo")  # shared-direction estimates from a loss closure
ZO_OPTIMIZERS = ("zo",) + ESTIMATOR_OPTIMIZERS  # forward-only; "zo" is the recommended method (ActivityZO)
FO_OPTIMIZERS = ("sgd", "adamw")
OPTIMIZERS = FO_OPTIMIZERS + ZO_OPTIMIZERS
#: ActivityZO's own: its directions on linear layers and its local losses (subgrad.optim.activity_blocks.LocalHead)
ZO_ONLY_SETTINGS = ("q_linear", "patches", "groups", "norm")
#: Settings an optimizer has no use for: giving one is an error, not silently ignored.
UNUSED_SETTINGS = {
    "zo": ("momentum", "estimator", "distribution", "blocks", "clip", "scale_by_block_size"),
    **{name: ZO_ONLY_SETTINGS for name in FO_OPTIMIZERS + ESTIMATOR_OPTIMIZERS},
}
SCHEDULES = ("cosine", "onecycle", "constant")
CUDA_GRAPH_MODES = ("auto", "on", "off")
#: --blocks values, or a block size in elements: the optimizers' modes (subgrad.optim.zo_settings.BLOCK_MODES)
#: with "none" for their None (one block, the whole model); make_optimizer translates, tests check the match
BLOCK_MODES = ("none", "tensor", "module")

#: Defaults per (model, optimizer).  Each row is what `subgrad train --model M --optimizer O` uses
#: when a flag is not given; README.md states the accuracy each reaches and how long it took.
DEFAULTS = {
    # activity perturbation with local losses (subgrad.optim.ActivityZO); settings chosen on a 5,000-image
    # validation split of the training set (--validation 5000; benchmarks/README.md "Choosing zo's settings"):
    # lenet q 8 on the convs, q_linear 16 on the fc layers, 9,000 steps (validation, mean of seeds 0-2: 58.6%,
    # ahead on every seed of q 8 x 7,500 steps, 57.6%, and of q 8 x 9,000 or 10,000, 57.8% / 57.5%; q_linear
    # 32 x 9,000: 58.4% at 1.2x the time; patch and group losses lower lenet's accuracy); resnet20: 4 x 4
    # patches x 4 groups (300-step validation runs: 18.6% vs 12.7% with one loss per block), 6,000 steps so
    # that the 1.3x costlier step stays inside the hour; its estimates carried through BatchNorm's batch
    # statistics (ActivityZO's through_batch_stats; 1,000-step validation runs: 27.5% vs 25.6% held fixed)
    ("lenet", "zo"): dict(
        batch_size=128,
        lr=2e-3,
        eps=1e-2,
        q=8,
        q_linear=16,
        patches=1,
        groups=1,
        norm=False,
        steps=9000,
        schedule="cosine",
        augment=False,
    ),
    ("resnet20", "zo"): dict(
        batch_size=128,
        lr=2e-3,
        eps=1e-2,
        q=1,
        patches=4,
        groups=4,
        norm=False,
        steps=6000,
        schedule="cosine",
        augment=False,
    ),
    ("lenet", "sgd"): dict(batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=15, schedule="onecycle"),
    ("lenet", "adamw"): dict(batch_size=128, lr=3e-3, weight_decay=5e-4, epochs=15, schedule="onecycle"),
    # 1,200 steps x 5 module blocks x 2 = 12,000 forward passes of batch 512 (see README for the figure)
    ("lenet", "zo-sgd"): dict(
        batch_size=512,
        lr=1e-3,
        eps=1e-3,
        q=1,
        blocks="module",
        scale_by_block_size=True,
        clip=0.2,
        steps=1200,
        schedule="cosine",
        augment=False,
    ),
    # forward differences share L0 across q = 4 directions: 2,400 steps x 5 = 12,000 forward passes;
    # Rademacher directions: 34.3% vs 33.9% gaussian (new direction map), and 5x cheaper to generate on CPU
    ("lenet", "zo-adam"): dict(
        batch_size=512,
        lr=2e-3,
        eps=1e-3,
        q=4,
        estimator="forward",
        steps=2400,
        schedule="cosine",
        augment=False,
        distribution="rademacher",
    ),
    ("lenet", "hizoo"): dict(batch_size=512, lr=2e-2, eps=1e-2, q=1, steps=4000, schedule="cosine", augment=False),
    ("resnet20", "sgd"): dict(batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, epochs=30, schedule="onecycle"),
    ("resnet20", "adamw"): dict(batch_size=128, lr=2e-3, weight_decay=5e-4, epochs=30, schedule="onecycle"),
    ("resnet20", "zo-sgd"): dict(
        batch_size=256, lr=5e-3, eps=1e-3, q=1, momentum=0.9, steps=6000, schedule="cosine", augment=False
    ),
    ("resnet20", "zo-adam"): dict(batch_size=256, lr=5e-4, eps=1e-3, q=1, steps=6000, schedule="cosine", augment=False),
    ("resnet20", "hizoo"): dict(batch_size=256, lr=5e-3, eps=1e-2, q=1, steps=4000, schedule="cosine", augment=False),
    # localnet is built for --optimizer zo; its first-order rows are the backprop comparison on the same model,
    # its shared-direction rows are resnet20's (not tuned for it)
    # localnet: q 2, 4 x 4 patches, 4 groups (1,500-step validation runs, benchmarks/README.md); lr 1e-3, not
    # those runs' 2e-3: Adam's steps on noisy estimates random-walk the weights by ~ lr sqrt(steps), and at
    # 2e-3 a 25,000-step run's test loss rose past chance (3.5) by step 4,000; 22,000 steps: 43 min on the
    # 2-core Intel Xeon VM, 29 min on the AMD EPYC one (benchmarks/README.md)
    ("localnet", "zo"): dict(
        batch_size=128,
        lr=1e-3,
        eps=1e-2,
        q=2,
        patches=4,
        groups=4,
        norm=False,
        steps=22000,
        schedule="cosine",
        augment=False,
    ),
    ("localnet", "sgd"): dict(batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=15, schedule="onecycle"),
    ("localnet", "adamw"): dict(batch_size=128, lr=2e-3, weight_decay=5e-4, epochs=15, schedule="onecycle"),
    ("localnet", "zo-sgd"): dict(
        batch_size=256, lr=5e-3, eps=1e-3, q=1, momentum=0.9, steps=6000, schedule="cosine", augment=False
    ),
    ("localnet", "zo-adam"): dict(batch_size=256, lr=5e-4, eps=1e-3, q=1, steps=6000, schedule="cosine", augment=False),
    ("localnet", "hizoo"): dict(batch_size=256, lr=5e-3, eps=1e-2, q=1, steps=4000, schedule="cosine", augment=False),
}
#: Settings a row of DEFAULTS leaves out take these (the same for every pair).
COMMON_DEFAULTS = dict(
    momentum=0.0,
    weight_decay=0.0,
    eps=1e-3,
    q=1,
    estimator="central",
    blocks="none",
    clip="off",
    scale_by_block_size=False,
    augment=True,
)


def _clip(value: str):
    """``--clip``: a positive bound, or ``off`` (``0`` is read as ``off``, its spelling before ``off``)."""
    if value == "off":
        return "off"
    try:
        bound = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off', got {value!r}") from None
    return "off" if bound == 0 else bound


def _blocks(value: str):
    """``--blocks``: none (one block: the whole model), tensor, module, or a block size in elements."""
    if value.isdigit():
        return int(value)
    if value not in BLOCK_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(BLOCK_MODES)} or a block size, got {value!r}")
    return value


def _setting(help: str, *, group: str | None = None, exclusive: str | None = None, **argparse_kwargs):
    """Metadata of one TrainConfig field: its help (written once) and how its flag parses."""
    return dict(help=help, group=group, exclusive=exclusive, argparse=argparse_kwargs)


ZO_GROUP = "zeroth-order (eps, q: every forward-only optimizer; the others: zo-sgd, zo-adam, hizoo)"


@dataclass
class TrainConfig:
    """All settings of a run.  ``None`` means "the default for this model/optimizer" (:func:`defaults_for`)."""

    model: str = field(default="lenet", metadata=_setting("network to train", choices=MODEL_NAMES))
    optimizer: str = field(
        default="sgd", metadata=_setting("optimizer (first-order or zeroth-order)", choices=OPTIMIZERS)
    )
    data: str = field(
        default="./data",
        metadata=_setting("CIFAR-10: .tar.gz, torchvision folder, ImageFolder tree, or a path to download to"),
    )
    out: str = field(default="runs/run", metadata=_setting("run folder"))
    device: str = field(
        default="auto", metadata=_setting("where to train (auto: cuda when available)", choices=("auto", "cpu", "cuda"))
    )
    seed: int = field(
        default=0, metadata=_setting("seeds the init, batch order, augmentation and directions", type=int)
    )
    epochs: float | None = field(
        default=None, metadata=_setting("training length in epochs", exclusive="length", type=float)
    )
    steps: int | None = field(
        default=None, metadata=_setting("training length in optimizer steps", exclusive="length", type=int)
    )
    batch_size: int | None = field(
        default=None, metadata=_setting("images per step (global, over all processes)", type=int)
    )
    lr: float | None = field(default=None, metadata=_setting("base learning rate", type=float))
    schedule: str | None = field(default=None, metadata=_setting("learning-rate schedule", choices=SCHEDULES))
    momentum: float | None = field(default=None, metadata=_setting("momentum (sgd, zo-sgd, hizoo)", type=float))
    weight_decay: float | None = field(default=None, metadata=_setting("L2 / decoupled weight decay", type=float))
    eps: float | None = field(default=None, metadata=_setting("perturbation size", group=ZO_GROUP, type=float))
    q: int | None = field(
        default=None,
        metadata=_setting(
            "directions per step (zo: per perturbed layer; with --q-linear, per conv layer)", group=ZO_GROUP, type=int
        ),
    )
    q_linear: int | None = field(
        default=None,
        metadata=_setting(
            "zo: directions per step on each fully connected layer (default: q)", group=ZO_GROUP, type=int
        ),
    )
    estimator: str | None = field(
        default=None,
        metadata=_setting(
            "finite differences: central (2 forwards per direction) or forward (1, plus a shared base loss)",
            group=ZO_GROUP,
            choices=("central", "forward"),
        ),
    )
    distribution: str | None = field(
        default=None,
        metadata=_setting(
            "direction distribution (default: rademacher when q > 1, else gaussian)",
            group=ZO_GROUP,
            choices=("gaussian", "rademacher"),
        ),
    )
    blocks: str | int | None = field(
        default=None,
        metadata=_setting(
            "blockwise estimation: none (the whole model), tensor, module, or a block size in elements",
            group=ZO_GROUP,
            type=_blocks,
        ),
    )
    clip: float | str | None = field(
        default=None,
        metadata=_setting("clamp finite-difference scalars to [-clip, clip], or off", group=ZO_GROUP, type=_clip),
    )
    scale_by_block_size: bool | None = field(
        default=None,
        metadata=_setting(
            "scale each block's step by (d + 2) / (d_block + 2)", group=ZO_GROUP, action=argparse.BooleanOptionalAction
        ),
    )
    patches: int | None = field(
        default=None,
        metadata=_setting(
            "zo: cut each convolutional block's output into patches x patches patches, each with its own local loss",
            group=ZO_GROUP,
            type=int,
        ),
    )
    groups: int | None = field(
        default=None,
        metadata=_setting("zo: channel groups per block, each with its own local loss", group=ZO_GROUP, type=int),
    )
    norm: bool | None = field(
        default=None,
        metadata=_setting(
            "zo: standardise each local loss's features before its head",
            group=ZO_GROUP,
            action=argparse.BooleanOptionalAction,
        ),
    )
    augment: bool | None = field(
        default=None, metadata=_setting("random crop + flip", action=argparse.BooleanOptionalAction)
    )
    validation: int = field(
        default=0,
        metadata=_setting(
            "hold out this many training images for validation (the same seeded subset for every --seed): "
            "metrics gain val_loss and val_accuracy; choose settings on them, not on the test set",
            type=int,
        ),
    )
    amp: bool = field(default=False, metadata=_setting("bfloat16 autocast on CUDA", action="store_true"))
    cuda_graph: str = field(
        default="auto",
        metadata=_setting(
            "capture the training step in a CUDA graph and replay it: auto (on CUDA when the step is capturable, "
            "else say why not), on (refuse to run uncaptured), off",
            choices=CUDA_GRAPH_MODES,
        ),
    )
    eval_every: int | None = field(
        default=None,
        metadata=_setting(
            "steps between evaluations (default: once per epoch first-order, 10 per run zeroth-order)", type=int
        ),
    )
    checkpoint_every: int | None = field(
        default=None, metadata=_setting("steps between checkpoints (default: with every evaluation)", type=int)
    )
    quiet: bool = field(
        default=False, metadata=_setting("no progress bar; print the summary as JSON", action="store_true")
    )

    def resolved(self) -> "TrainConfig":
        """A copy with every default filled in for this model/optimizer pair, validated (one-line errors)."""
        if self.model not in MODEL_NAMES:
            raise ValueError(f"--model must be one of {MODEL_NAMES}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in UNUSED_SETTINGS.get(self.optimizer, ()):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"--{name.replace('_', '-')} does not apply to --optimizer {self.optimizer}; leave it out"
                )
        if self.optimizer == "zo" and self.amp:
            raise ValueError("--amp is not supported with --optimizer zo (its step runs in float32); leave it out")
        cfg = dataclasses.replace(self)
        for key, value in defaults_for(self.model, self.optimizer).items():
            if getattr(cfg, key) is None and not (key in ("epochs", "steps") and (cfg.epochs or cfg.steps)):
                setattr(cfg, key, value)
        if cfg.clip == 0:  # how run folders written before "off" spelled it
            cfg.clip = "off"
        if cfg.cuda_graph not in CUDA_GRAPH_MODES:
            raise ValueError(f"--cuda-graph must be one of {CUDA_GRAPH_MODES}, got {cfg.cuda_graph!r}")
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
        for name in ("batch_size", "q", "q_linear", "patches", "groups"):
            if getattr(cfg, name) is not None and int(getattr(cfg, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
        if cfg.lr is None or not cfg.lr > 0:
            raise ValueError(f"--lr must be > 0, got {cfg.lr}")
        if cfg.steps is not None and cfg.steps < 1 or cfg.epochs is not None and cfg.epochs <= 0:
            raise ValueError("--steps must be >= 1 and --epochs > 0")
        if cfg.clip not in ("off", None) and not (isinstance(cfg.clip, (int, float)) and cfg.clip > 0):
            raise ValueError(f"--clip must be a positive number or 'off', got {cfg.clip!r}")
        if not (isinstance(cfg.validation, int) and 0 <= cfg.validation < 50000):
            raise ValueError(f"--validation must be a number of training images in [0, 50000), got {cfg.validation!r}")
        if not (cfg.blocks is None or cfg.blocks in BLOCK_MODES or isinstance(cfg.blocks, int) and cfg.blocks >= 1):
            raise ValueError(f"--blocks must be one of {BLOCK_MODES} or a block size >= 1, got {cfg.blocks!r}")
        return cfg

    @classmethod
    def from_record(cls, record: dict) -> "TrainConfig":
        """The config of a run folder's config.json / a checkpoint (other keys there are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def defaults_for(model: str, optimizer: str) -> dict:
    """Every default setting of the pair: its DEFAULTS row over COMMON_DEFAULTS (less the settings the
    optimizer has no use for, which stay None)."""
    unused = UNUSED_SETTINGS.get(optimizer, ())
    return {k: v for k, v in {**COMMON_DEFAULTS, **DEFAULTS[(model, optimizer)]}.items() if k not in unused}


def add_config_arguments(
    parser: argparse.ArgumentParser,
    model: str = "lenet",
    optimizer: str = "sgd",
    only: tuple[str, ...] | None = None,
    defaults: dict | None = None,
) -> None:
    """One flag per TrainConfig field (``--batch-size`` for ``batch_size``), help from its metadata, with
    the default resolved for ``model``/``optimizer`` (the pair given on the command line, so ``subgrad
    train --model resnet20 --optimizer zo-sgd --help`` shows that pair's values).  ``only`` restricts the
    fields (``subgrad run``); ``defaults`` overrides field defaults (``subgrad run --out runs/main``)."""
    pair = defaults_for(model, optimizer) if (model, optimizer) in DEFAULTS else {}
    groups, exclusive = {}, {}
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        default = (defaults or {}).get(f.name, f.default)
        shown = pair.get(f.name, default)
        if shown is None or meta["argparse"].get("action") == "store_true":
            help_text = meta["help"]
        else:
            shown = {True: "on", False: "off"}.get(shown, shown) if isinstance(shown, bool) else shown
            help_text = f"{meta['help']} (default: {shown}" + (f" for {model}/{optimizer})" if f.name in pair else ")")
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        if meta["exclusive"]:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = target.add_mutually_exclusive_group()
            target = exclusive[meta["exclusive"]]
        kwargs = dict(meta["argparse"], default=default)
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=help_text, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags (fields a command does not expose keep their defaults)."""
    return TrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    )
