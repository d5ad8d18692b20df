"""Training settings in one place: the defaults table, :class:`TrainConfig`, and the command-line flags
that ``subgrad train`` and ``subgrad run`` generate from it.

Each setting is one :class:`TrainConfig` field, documented once (its ``help``).  A setting left
:data:`UNSET` takes the default of the model/optimizer pair: :mod:`.optimizers`' row for the pair (the
registry of optimizers), else :data:`COMMON_DEFAULTS`.  ``None`` is what it is to the optimizers: off
(``clip``), one block (``blocks``), their own rule (``distribution``, ``q_linear``), or not this one
(``epochs`` vs ``steps``); a setting that has no such meaning reads None as UNSET (``lr=None``: the pair's
lr).  The command line's ``--clip off`` and ``--blocks none`` parse to ``None``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from dataclasses import dataclass, field

from ..model_names import MODEL_HELP, defaults_row, model_source
from .optimizers import OPTIMIZERS, REGISTRY

SCHEDULES = ("cosine", "onecycle", "constant")
CUDA_GRAPH_MODES = ("auto", "on", "off")
#: --blocks values, or a block size in elements: "none" (parsed to None: one block, the whole model) and the
#: optimizers' modes (subgrad.optim.zo_settings.BLOCK_MODES; a test checks they agree)
BLOCK_CHOICES = ("none", "tensor", "module")


class _Unset(enum.Enum):
    UNSET = "unset"

    def __repr__(self) -> str:
        return "UNSET"


#: A TrainConfig setting not given: resolved() takes the pair's default.
UNSET = _Unset.UNSET
#: The settings whose None is a value of its own (module docstring); for every other setting the pair's
#: defaults cover, None is read as UNSET (``TrainConfig(lr=None)``: the pair's lr), as it has no other meaning.
NONE_IS_A_VALUE = ("clip", "blocks", "distribution", "q_linear", "epochs", "steps")

#: Settings a registry row (optimizers.py) leaves out take these (the same for every pair).
COMMON_DEFAULTS = dict(
    momentum=0.0,
    weight_decay=0.0,
    eps=1e-3,
    q=1,
    estimator="central",
    blocks=None,
    clip=None,
    scale_by_block_size=False,
    augment=True,
)


def _clip(value: str):
    """``--clip``: a positive bound, or ``off`` (None; ``0`` is read as ``off``, its spelling before ``off``)."""
    if value == "off":
        return None
    try:
        bound = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off', got {value!r}") from None
    return None if bound == 0 else bound


def _blocks(value: str):
    """``--blocks``: none (None: one block, the whole model), tensor, module, or a block size in elements."""
    if value.isdigit():
        return int(value)
    if value not in BLOCK_CHOICES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(BLOCK_CHOICES)} or a block size, got {value!r}")
    return None if value == "none" else value


def _model(value: str) -> str:
    """``--model``: a built-in name, torchvision:NAME or package.module:callable (checked, not imported)."""
    try:
        model_source(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--model {value!r}: ")) from None
    return value


def _is_model(value) -> bool:
    try:
        return bool(model_source(value))
    except ValueError:
        return False


def _setting(
    help: str,
    *,
    group: str | None = None,
    exclusive: str | None = None,
    none_shown: str | None = None,
    **argparse_kwargs,
):
    """Metadata of one TrainConfig field: its help (written once), how its flag parses, and how --help
    spells a None default (``none_shown``: "off" for --clip)."""
    return dict(help=help, group=group, exclusive=exclusive, none_shown=none_shown, argparse=argparse_kwargs)


def _per_pair(help: str, **kwargs):
    """A TrainConfig field whose default comes from the model/optimizer pair: UNSET until resolved()."""
    return field(default=UNSET, metadata=_setting(help, **kwargs))


ZO_GROUP = "zeroth-order (eps, q: every forward-only optimizer; the others: zo-sgd, zo-adam, hizoo)"


@dataclass
class TrainConfig:
    """All settings of a run.  :data:`UNSET` means "the default for this model/optimizer" (:func:`defaults_for`);
    ``None`` means off / not this one, as to the optimizers (module docstring)."""

    model: str = field(default="lenet", metadata=_setting(MODEL_HELP, type=_model, metavar="MODEL", none_shown="lenet"))
    optimizer: str = field(
        default="sgd",
        metadata=_setting("; ".join(f"{n}: {e.summary}" for n, e in REGISTRY.items()), choices=OPTIMIZERS),
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
    epochs: float | None = _per_pair("training length in epochs", exclusive="length", type=float)
    steps: int | None = _per_pair("training length in optimizer steps", exclusive="length", type=int)
    batch_size: int | None = _per_pair("images per step (global, over all processes)", type=int)
    lr: float | None = _per_pair("base learning rate", type=float)
    schedule: str | None = _per_pair("learning-rate schedule", choices=SCHEDULES)
    momentum: float | None = _per_pair("momentum (sgd, zo-sgd, hizoo)", type=float)
    weight_decay: float | None = _per_pair("L2 / decoupled weight decay", type=float)
    eps: float | None = _per_pair("perturbation size", group=ZO_GROUP, type=float)
    q: int | None = _per_pair(
        "directions per step (zo: per perturbed layer; with --q-linear, per conv layer)", group=ZO_GROUP, type=int
    )
    q_linear: int | None = _per_pair(
        "zo: directions per step on each fully connected layer (default: q)", group=ZO_GROUP, type=int
    )
    estimator: str | None = _per_pair(
        "finite differences: central (2 forwards per direction) or forward (1, plus a shared base loss)",
        group=ZO_GROUP,
        choices=("central", "forward"),
    )
    distribution: str | None = _per_pair(
        "direction distribution (default: rademacher when q > 1, else gaussian)",
        group=ZO_GROUP,
        choices=("gaussian", "rademacher"),
    )
    blocks: str | int | None = _per_pair(
        "blockwise estimation: none (the whole model), tensor, module, or a block size in elements",
        group=ZO_GROUP,
        none_shown="none",
        type=_blocks,
    )
    clip: float | None = _per_pair(
        "clamp finite-difference scalars to [-clip, clip], or off", group=ZO_GROUP, none_shown="off", type=_clip
    )
    scale_by_block_size: bool | None = _per_pair(
        "scale each block's step by (d + 2) / (d_block + 2)", group=ZO_GROUP, action=argparse.BooleanOptionalAction
    )
    patches: int | None = _per_pair(
        "zo: cut each convolutional block's output into patches x patches patches, each with its own local loss",
        group=ZO_GROUP,
        type=int,
    )
    groups: int | None = _per_pair(
        "zo: channel groups per block, each with its own local loss", group=ZO_GROUP, type=int
    )
    norm: bool | None = _per_pair(
        "zo: standardise each local loss's features before its head",
        group=ZO_GROUP,
        action=argparse.BooleanOptionalAction,
    )
    augment: bool | None = _per_pair("random crop + flip", action=argparse.BooleanOptionalAction)
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
        model_source(self.model)  # a one-line error for a name that is none of the three kinds
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        entry = REGISTRY[self.optimizer]
        for name in entry.unused():
            if getattr(self, name) not in (UNSET, None):
                raise ValueError(
                    f"--{name.replace('_', '-')} does not apply to --optimizer {self.optimizer}; leave it out"
                )
        if self.amp and not entry.amp:
            raise ValueError(
                f"--amp is not supported with --optimizer {self.optimizer} (its step runs in float32); leave it out"
            )
        cfg = dataclasses.replace(self)
        pair = defaults_for(self.model, self.optimizer)
        length_given = any(getattr(cfg, k) not in (UNSET, None) for k in ("epochs", "steps"))
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            length = f.name in ("epochs", "steps")  # None: "not this one", when the other is given
            if value is UNSET or value is None and f.name in PER_PAIR and (f.name not in NONE_IS_A_VALUE or length):
                setattr(cfg, f.name, None if length and length_given else pair.get(f.name))
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
        if cfg.clip is not None and not (isinstance(cfg.clip, (int, float)) and cfg.clip > 0):
            raise ValueError(f"--clip must be a positive number or None (off), got {cfg.clip!r}")
        if not (isinstance(cfg.validation, int) and 0 <= cfg.validation < 50000):
            raise ValueError(f"--validation must be a number of training images in [0, 50000), got {cfg.validation!r}")
        if not (cfg.blocks in (None, *BLOCK_CHOICES[1:]) or isinstance(cfg.blocks, int) and cfg.blocks >= 1):
            raise ValueError(
                f"--blocks must be None (one block), one of {BLOCK_CHOICES[1:]} or a block size >= 1, "
                f"got {cfg.blocks!r}"
            )
        return cfg

    @classmethod
    def from_record(cls, record: dict) -> "TrainConfig":
        """The config of a run folder's config.json / a checkpoint: every recorded setting as given (null is
        None), the rest UNSET.  Other keys there are ignored, and so are settings its optimizer does not read
        (runs written before the registry recorded them, unused).  Earlier spellings of off are read as None:
        ``clip`` "off" or 0, ``blocks`` "none"."""
        names = {f.name for f in dataclasses.fields(cls)}
        entry = REGISTRY.get(record.get("optimizer"))
        unused = set(entry.unused()) if entry else set()
        settings = {k: v for k, v in record.items() if k in names and k not in unused}
        if settings.get("clip") in ("off", 0):
            settings["clip"] = None
        if settings.get("blocks") == "none":
            settings["blocks"] = None
        return cls(**settings)


#: the settings whose default comes from the model/optimizer pair
PER_PAIR = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.default is UNSET)


def defaults_for(model: str, optimizer: str) -> dict:
    """Every default setting of the pair: its registry row over COMMON_DEFAULTS (less the settings the
    optimizer has no use for, which resolve to None)."""
    entry = REGISTRY[optimizer]
    unused = entry.unused()
    return {k: v for k, v in {**COMMON_DEFAULTS, **entry.defaults[defaults_row(model)]}.items() if k not in unused}


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
    pair = defaults_for(model, optimizer) if _is_model(model) and optimizer in OPTIMIZERS else {}
    groups, exclusive = {}, {}
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        default = (defaults or {}).get(f.name, None if f.name == "model" else f.default)
        shown = pair.get(f.name, default)
        if shown is None and meta["none_shown"]:
            shown = meta["none_shown"]
        if shown in (None, UNSET) or meta["argparse"].get("action") == "store_true":
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
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if values.get("model") is None:  # --model not given (None, so that --resume can tell)
        values.pop("model", None)
    return TrainConfig(**values)
