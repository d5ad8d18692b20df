"""Model names the command line takes, importable without torch (``--help`` stays fast): the built-in
models (name -> class in :mod:`subgrad.models`, which builds them), ``torchvision:NAME`` (a torchvision
classification model, 10 classes) and ``package.module:callable`` (the user's own constructor, called with
no arguments).

A user's constructor is code: subgrad imports it only when the user names it on the command line that
runs (``subgrad train --model``, ``--code`` for export, validate and bench), never because a run folder or
an ONNX file names it.
"""

MODEL_CLASSES = {"lenet": "LeNet", "resnet20": "ResNet20", "localnet": "LocalNet"}
MODEL_NAMES = tuple(MODEL_CLASSES)
TORCHVISION = "torchvision:"
#: the defaults-table row of every model without one of its own (torchvision's, the user's)
GENERIC_ROW = "generic"
MODEL_HELP = (
    f"network to train: {', '.join(MODEL_NAMES)}, torchvision:NAME (e.g. torchvision:resnet18), "
    "or package.module:callable (your constructor)"
)


def model_source(spec: str) -> str:
    """ "builtin", "torchvision" or "code" (a user's constructor); a one-line ValueError for anything else."""
    if spec in MODEL_CLASSES:
        return "builtin"
    if isinstance(spec, str) and spec.startswith(TORCHVISION) and spec[len(TORCHVISION) :].isidentifier():
        return "torchvision"
    module, colon, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if colon and attr.isidentifier() and all(part.isidentifier() for part in module.split(".")):
        return "code"
    raise ValueError(
        f"--model {spec!r}: expected one of {', '.join(MODEL_NAMES)}, torchvision:NAME (e.g. torchvision:resnet18) "
        "or package.module:callable (your constructor)"
    )


def defaults_row(spec: str) -> str:
    """The row of the defaults table a model takes: its own for a built-in model, else the generic one."""
    return spec if spec in MODEL_CLASSES else GENERIC_ROW
