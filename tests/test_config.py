"""subgrad/training/config.py and optimizers.py: one TrainConfig, the registry of optimizers with their
defaults, and the flags generated from them."""

import argparse
import dataclasses
import json

import numpy as np
import pytest

from subgrad import cli
from subgrad.model_names import GENERIC_ROW, MODEL_NAMES
from subgrad.models import MODELS
from subgrad.training.config import COMMON_DEFAULTS, UNSET, TrainConfig, config_from_args, defaults_for
from subgrad.training.optimizers import OPTIMIZER_SETTINGS, OPTIMIZERS, REGISTRY, STEP_KINDS

LAUNCHER_FLAGS = {"resume", "nproc", "max_restarts"}  # train flags that are not training settings
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _subcommand(name: str, model: str = "lenet", optimizer: str = "sgd") -> argparse.ArgumentParser:
    parser = cli.build_parser(model, optimizer)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _dests(parser: argparse.ArgumentParser) -> set:
    return {a.dest for a in parser._actions if a.dest != "help"}


def test_every_field_is_a_train_flag_and_every_setting_flag_a_field():
    dests = _dests(_subcommand("train"))
    assert dests - LAUNCHER_FLAGS == FIELDS, (
        f"flags without a field: {dests - LAUNCHER_FLAGS - FIELDS}; fields without a flag: {FIELDS - dests}"
    )


def test_run_takes_every_training_setting_too():
    assert _dests(_subcommand("run")) - {"bench_runs"} == FIELDS


def test_one_default_per_setting_for_every_pair():
    assert tuple(MODELS) == MODEL_NAMES
    assert set(OPTIMIZER_SETTINGS) <= FIELDS
    for name, entry in REGISTRY.items():
        assert set(entry.defaults) == {*MODEL_NAMES, GENERIC_ROW}, f"{name}: a defaults row for every model"
        assert entry.step_kind in STEP_KINDS and set(entry.settings) <= set(OPTIMIZER_SETTINGS), name
    for pair, row in ((p, REGISTRY[p[1]].defaults[p[0]]) for p in ((m, o) for m in MODEL_NAMES for o in OPTIMIZERS)):
        assert set(row) <= FIELDS, f"{pair}: not settings: {set(row) - FIELDS}"
        resolved = TrainConfig(model=pair[0], optimizer=pair[1]).resolved()
        unused = set(REGISTRY[pair[1]].unused())
        # distribution and q_linear: None is the optimizers' own rule (subgrad.optim.zo_settings.default_distribution:
        # rademacher when q > 1; ActivitySettings: q_linear as many as q), so the rule has one home
        missing = [
            f
            for f in FIELDS - {"epochs", "steps", "eval_every", "checkpoint_every", "distribution", "q_linear"} - unused
            if f not in {**COMMON_DEFAULTS, **row} and getattr(resolved, f) is None
        ]
        assert not missing, f"{pair}: no default for {missing}"
        assert UNSET not in dataclasses.asdict(resolved).values(), f"{pair}: a setting left unresolved"
        assert all(getattr(resolved, f) is None for f in unused), f"{pair}: an unused setting got a value"
        assert (resolved.epochs is None) != (resolved.steps is None), f"{pair}: one training length"
        for key, value in {**COMMON_DEFAULTS, **row}.items():
            if key not in unused:
                assert getattr(resolved, key) == value, f"{pair}.{key}: {getattr(resolved, key)} != {value}"


def test_explicit_values_win_over_the_table():
    cfg = TrainConfig(model="lenet", optimizer="zo-adam", distribution="gaussian", lr=1e-4, steps=7).resolved()
    assert (cfg.distribution, cfg.lr, cfg.steps, cfg.epochs) == ("gaussian", 1e-4, 7, None)
    assert TrainConfig(model="lenet", optimizer="sgd", steps=3).resolved().epochs is None  # steps replace epochs


def test_help_shows_the_default_of_the_chosen_pair():
    def help_of(model, optimizer, flag):
        parser = _subcommand("train", model, optimizer)
        return next(a.help for a in parser._actions if flag in a.option_strings)

    assert "(default: 0.005 for resnet20/zo-sgd)" in help_of("resnet20", "zo-sgd", "--lr")
    assert "(default: 0.05 for lenet/sgd)" in help_of("lenet", "sgd", "--lr")
    assert "(default: off for lenet/zo-adam)" in help_of("lenet", "zo-adam", "--clip")
    assert "(default: 0.2 for lenet/zo-sgd)" in help_of("lenet", "zo-sgd", "--clip")


@pytest.mark.parametrize(
    "flag, value, expected",
    [("--clip", "off", None), ("--clip", "0", None), ("--clip", "0.2", 0.2), ("--blocks", "none", None)]
    + [("--blocks", "module", "module"), ("--blocks", "64", 64)],
)
def test_off_flags_parse_to_none(flag, value, expected):
    args = cli.build_parser().parse_args(["train", "--optimizer", "zo-sgd", flag, value])
    config = config_from_args(args)
    assert getattr(config, flag[2:]) == expected and getattr(config.resolved(), flag[2:]) == expected


def test_none_is_off_and_unset_is_the_pairs_default():
    """lenet/zo-sgd clips at 0.2 by default: None turns that off, and a record of None stays off on resume."""
    assert TrainConfig(model="lenet", optimizer="zo-sgd").clip is UNSET
    assert TrainConfig(model="lenet", optimizer="zo-sgd").resolved().clip == 0.2
    off = TrainConfig(model="lenet", optimizer="zo-sgd", clip=None, blocks=None).resolved()
    assert (off.clip, off.blocks) == (None, None)
    record = json.loads(json.dumps(dataclasses.asdict(off)))
    assert (TrainConfig.from_record(record).resolved().clip, record["clip"]) == (None, None)
    args = cli.build_parser().parse_args(["train", "--optimizer", "zo-sgd"])
    assert config_from_args(args).clip is UNSET and config_from_args(args).resolved().clip == 0.2


def test_none_of_a_setting_that_cannot_be_off_is_the_pairs_default():
    cfg = TrainConfig(model="lenet", optimizer="zo-sgd", lr=None, batch_size=None, clip=None).resolved()
    row = REGISTRY["zo-sgd"].defaults["lenet"]
    assert (cfg.lr, cfg.batch_size, cfg.clip) == (row["lr"], row["batch_size"], None)
    cfg = TrainConfig(model="lenet", optimizer="sgd", epochs=None, steps=None).resolved()  # no length given
    assert (cfg.epochs, cfg.steps) == (REGISTRY["sgd"].defaults["lenet"]["epochs"], None)
    assert TrainConfig(model="lenet", optimizer="sgd", epochs=None, steps=5).resolved().epochs is None


@pytest.mark.parametrize("settings", [dict(clip="off"), dict(blocks="none"), dict(clip="0.2")])
def test_the_command_lines_spellings_are_refused_in_python(settings):
    with pytest.raises(ValueError, match="None"):
        TrainConfig(optimizer="zo-sgd", **settings).resolved()


@pytest.mark.parametrize(
    "argv", [["train", "--clip", "none"], ["train", "--blocks", "layer"], ["train", "--epochs", "1", "--steps", "2"]]
)
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    assert pytest.raises(SystemExit, cli.build_parser().parse_args, argv).value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(clip=-1.0), "--clip"),
        (dict(blocks=0), "--blocks"),
        (dict(lr=0.0), "--lr"),
        (dict(q=0), "--q"),
        (dict(schedule="step"), "--schedule"),
        (dict(model="vgg"), "--model"),
    ],
)
def test_resolved_refuses_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(optimizer="zo-sgd", **settings).resolved()


@pytest.mark.parametrize("optimizer, name", [(o, n) for o, e in REGISTRY.items() for n in e.unused()], ids=str)
def test_a_setting_the_optimizer_has_no_use_for_is_refused(optimizer, name):
    value = {"clip": 0.5, "blocks": "module", "estimator": "forward", "distribution": "gaussian", "norm": True}
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} does not apply to --optimizer {optimizer}"):
        TrainConfig(optimizer=optimizer, **{name: value.get(name, 2)}).resolved()


def test_zo_only_settings_are_refused_by_every_other_optimizer():
    for optimizer in OPTIMIZERS:
        if optimizer != "zo":
            assert {"q_linear", "patches", "groups", "norm"} <= set(REGISTRY[optimizer].unused()), optimizer


def test_run_folder_written_before_config_py_still_loads(tmp_path):
    """config.json of older runs: an "extra" field, clip 0 / "off" and blocks "none" for None, extra keys."""
    old = dict(
        model="lenet",
        optimizer="zo-sgd",
        clip=0,
        blocks="module",
        extra={},
        steps_total=10,
        mean=[0.5] * 3,
        model_config={},
        world_size=1,
    )
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = TrainConfig.from_record(json.loads((tmp_path / "config.json").read_text())).resolved()
    assert (cfg.clip, cfg.blocks) == (None, "module")
    cfg = TrainConfig.from_record(dict(old, clip="off", blocks="none")).resolved()
    assert (cfg.clip, cfg.blocks) == (None, None)
    assert TrainConfig.from_record(dict(old, optimizer="zo-adam", clip=None)).resolved().clip is None
    # settings an optimizer never read, recorded by runs before the registry, are dropped on load
    sgd = dict(model="lenet", optimizer="sgd", eps=1e-3, q=1, estimator="central", blocks="none", clip="off")
    cfg = TrainConfig.from_record(sgd).resolved()
    assert (cfg.eps, cfg.q, cfg.clip, cfg.lr) == (None, None, None, REGISTRY["sgd"].defaults["lenet"]["lr"])


def test_make_optimizer_maps_off_and_none():
    from subgrad.models import build_model
    from subgrad.training.run_setup import make_optimizer

    model = build_model("lenet")
    opt = make_optimizer(TrainConfig(model="lenet", optimizer="zo-adam").resolved(), model)
    assert opt.settings.clip is None and opt.settings.blocks is None  # the optimizers' "off" and "one block"
    opt = make_optimizer(TrainConfig(model="lenet", optimizer="zo-sgd").resolved(), model)
    assert opt.settings.clip == 0.2 and opt.settings.blocks == "module"


def test_defaults_for_is_the_table():
    assert defaults_for("lenet", "zo-sgd")["clip"] == REGISTRY["zo-sgd"].defaults["lenet"]["clip"]
    assert "clip" in defaults_for("lenet", "zo-adam") and COMMON_DEFAULTS["clip"] is None  # off
    assert "clip" not in defaults_for("lenet", "sgd")  # sgd reads no clip: it stays None and giving one is refused


@pytest.mark.parametrize(
    "settings, flag",
    [
        (dict(estimator="forward"), "--estimator"),
        (dict(momentum=0.9), "--momentum"),
        (dict(distribution="gaussian"), "--distribution"),
        (dict(blocks="module"), "--blocks"),
        (dict(clip=0.1), "--clip"),
        (dict(amp=True), "--amp"),
        (dict(validation=-1), "--validation"),
    ],
)
def test_zo_refuses_settings_it_has_no_use_for(settings, flag):
    """`--optimizer zo` never accepts and ignores: a setting of the shared-direction estimators is an error."""
    with pytest.raises(ValueError, match=flag):
        TrainConfig(optimizer="zo", **settings).resolved()


def test_zo_defaults_and_validation_split():
    from subgrad.training.run_setup import VALIDATION_SEED, validation_split

    cfg = TrainConfig(model="lenet", optimizer="zo").resolved()
    assert (cfg.estimator, cfg.clip, cfg.momentum, cfg.distribution) == (None, None, None, None)
    assert cfg.eps == REGISTRY["zo"].defaults["lenet"]["eps"] and cfg.validation == 0
    images, labels = np.arange(100 * 2).reshape(100, 2), np.arange(100)
    train_x, train_y, val_x, val_y = validation_split(images, labels, 30)
    assert len(val_y) == 30 and len(train_y) == 70 and not set(val_y) & set(train_y)
    assert (train_x[:, 1] // 2 == train_y).all() and (val_x[:, 1] // 2 == val_y).all()  # images follow labels
    assert list(val_y) == sorted(val_y)  # archive order kept
    assert VALIDATION_SEED and validation_split(images, labels, 30)[3].tolist() == val_y.tolist()  # fixed split
    assert len(validation_split(images, labels, 0)[2]) == 0
    with pytest.raises(ValueError, match="leaves no training images"):
        validation_split(images, labels, 100)


def test_block_modes_are_the_optimizers():
    """--blocks spells the optimizers' None (one block) "none"; every other mode is theirs, in their order."""
    from subgrad.optim import zo_settings
    from subgrad.training import config

    assert tuple("none" if m is None else m for m in zo_settings.BLOCK_MODES) == config.BLOCK_CHOICES
