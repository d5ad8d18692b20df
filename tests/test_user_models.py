"""`--model` beyond the built-in networks: torchvision:NAME and the user's package.module:callable, whose
code subgrad imports only when the user names it on the command line (never because a run folder or an
ONNX file names it).  Fast tier but for the real-data round trip (train, resume, export, validate: slow)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from conftest import real_archive
from subgrad import cli
from subgrad.model_names import GENERIC_ROW, model_source
from subgrad.models import build_model
from subgrad.training.config import TrainConfig, config_from_args, defaults_for
from subgrad.training.optimizers import REGISTRY
from subgrad.training.run_setup import resume_config

CODE = "user_model_fixture:small_cnn"


@pytest.mark.parametrize(
    "spec, source",
    [("lenet", "builtin"), ("torchvision:resnet18", "torchvision"), (CODE, "code"), ("a.b.c:make", "code")],
)
def test_model_names_of_three_kinds(spec, source):
    assert model_source(spec) == source


@pytest.mark.parametrize("spec", ["vgg", "torchvision:", "torchvision:res-net", "a.b:", ":f", "a b:c", "a:b:c", ""])
def test_other_model_names_are_refused_in_one_line(spec, capsys):
    with pytest.raises(ValueError, match="expected one of lenet"):
        model_source(spec)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--model", spec])
    assert "argument --model" in capsys.readouterr().err


def test_torchvision_models_take_a_cifar_stem():
    resnet = build_model("torchvision:resnet18")
    assert (resnet.conv1.kernel_size, resnet.conv1.stride, type(resnet.maxpool)) == ((3, 3), (1, 1), nn.Identity)
    mobilenet = build_model("torchvision:mobilenet_v2")
    assert mobilenet.features[0][0].stride == (1, 1)
    with torch.no_grad():
        assert mobilenet.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        build_model("torchvision:fasterrcnn_resnet50_fpn")


def test_user_code_is_imported_only_when_named():
    with pytest.raises(ValueError, match=f"add --model {CODE}"):
        build_model(CODE)
    with pytest.raises(ValueError, match="add --model"):
        build_model(CODE, code_named="user_model_fixture:other")
    assert isinstance(build_model(CODE, code_named=CODE), nn.Sequential)
    spec = "user_model_fixture:not_a_model"
    with pytest.raises(ValueError, match="returned a str, not a torch.nn.Module"):
        build_model(spec, code_named=spec)


def test_models_without_a_row_take_the_generic_one():
    for name, entry in REGISTRY.items():
        assert defaults_for("torchvision:resnet18", name) == defaults_for(CODE, name)
        assert entry.defaults[GENERIC_ROW], name
    cfg = TrainConfig(model="torchvision:mobilenet_v2", optimizer="zo").resolved()
    assert (cfg.q, cfg.patches, cfg.steps) == tuple(
        REGISTRY["zo"].defaults[GENERIC_ROW][k] for k in ("q", "patches", "steps")
    )


def test_resume_of_user_code_needs_it_named_again(tmp_path):
    record = dict(TrainConfig(model=CODE, optimizer="zo").resolved().__dict__)
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"add --model {CODE}"):
        resume_config(tmp_path)
    with pytest.raises(ValueError, match="not --model 'lenet'"):
        resume_config(tmp_path, model="lenet")
    assert resume_config(tmp_path, model=CODE).model == CODE
    args = cli.build_parser().parse_args(["train", "--resume", str(tmp_path)])
    assert args.model is None and config_from_args(args).model == "lenet"  # not given: the run's, on resume


@pytest.mark.slow
def test_a_user_model_trains_resumes_exports_and_validates(tmp_path, capsys):
    """The whole round trip on the real archive, through the command line, with the code named each time."""
    data, run = str(real_archive()), tmp_path / "run"
    common = ["--data", data, "--device", "cpu", "--quiet"]
    assert cli.main(["train", "--model", CODE, "--optimizer", "zo", "--steps", "4", "--out", str(run), *common]) == 0
    assert cli.main(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 2  # the code not named
    assert "add --model" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run), "--steps", "6", "--quiet", "--model", CODE]) == 0
    onnx = run / "model.onnx"
    assert cli.main(["export", str(run), "--out", str(onnx)]) == 2
    assert "--code" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--out", str(onnx), "--code", CODE]) == 0
    assert cli.main(["validate", str(onnx), "--run", str(run), "--data", data, "--limit", "200", "--code", CODE]) == 0
