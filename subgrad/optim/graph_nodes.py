"""What each kind of node of a traced model is to ActivityZO's estimate (:mod:`.activity_graph`): the
layers it trains, the operations that act unit by unit (so a unit's perturbation reaches one unit), the
ranges where an activation passes its input, and the pools, averages and flattens it maps units through."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

SITE_LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
#: modules whose parameters the method leaves as they are (a norm's scale and shift)
UNTRAINED = (*NORMS, nn.LayerNorm, nn.GroupNorm)


def passing_range(module_or_fn) -> tuple[float, float] | None:
    """The range (low, high) outside which an activation is flat (derivative 0), else None."""
    if module_or_fn in (F.relu, torch.relu) or isinstance(module_or_fn, nn.ReLU):
        return 0.0, float("inf")
    if module_or_fn is F.relu6 or isinstance(module_or_fn, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(module_or_fn, nn.Hardtanh):
        return module_or_fn.min_val, module_or_fn.max_val
    if isinstance(module_or_fn, nn.Hardswish):  # flat (derivative 0) below -3 only
        return -3.0, float("inf")
    return None


PER_UNIT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish)
PER_UNIT_MODULES += (nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, *NORMS)
PER_UNIT_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.dropout)
ADDS = (operator.add, torch.add, operator.iadd)


def is_per_unit(target) -> bool:
    """An operation whose output unit depends on the same input unit only (or a residual sum)."""
    return isinstance(target, PER_UNIT_MODULES) or target in PER_UNIT_FUNCTIONS or target in ADDS


def getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def pool_of(modules: dict, n: fx.Node):
    """("max" | "avg", kernel, stride, padding) of a 2-D pooling node with square windows, else None."""
    m = modules.get(n)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        kind, kernel, stride, padding = (
            "max" if isinstance(m, nn.MaxPool2d) else "avg",
            m.kernel_size,
            m.stride,
            m.padding,
        )
    elif n.op == "call_function" and n.target in (F.max_pool2d, F.avg_pool2d, torch.max_pool2d):
        kind = "avg" if n.target is F.avg_pool2d else "max"
        kernel = n.kwargs.get("kernel_size", n.args[1] if len(n.args) > 1 else None)
        stride = n.kwargs.get("stride", n.args[2] if len(n.args) > 2 else None) or kernel
        padding = n.kwargs.get("padding", n.args[3] if len(n.args) > 3 else 0)
    else:
        return None
    if isinstance(m, nn.MaxPool2d) and (m.dilation not in (1, (1, 1)) or m.ceil_mode):
        return None
    square = [v if isinstance(v, int) else (v[0] if len(set(v)) == 1 else None) for v in (kernel, stride, padding)]
    return None if None in square else (kind, *square)


def is_global_average(modules: dict, n: fx.Node) -> bool:
    """An average over all positions to one (adaptive pooling to 1 x 1)."""
    m, size = modules.get(n), None
    if isinstance(m, nn.AdaptiveAvgPool2d):
        size = m.output_size
    elif n.op == "call_function" and n.target is F.adaptive_avg_pool2d:
        size = n.kwargs.get("output_size", n.args[1] if len(n.args) > 1 else None)
    return size in (1, (1, 1), [1, 1])


def is_flatten(modules: dict, n: fx.Node) -> bool:
    return isinstance(modules.get(n), nn.Flatten) or n.target in (torch.flatten, "flatten")


def check_trainable(graph: fx.Graph, model: nn.Module, modules: dict) -> None:
    """Refuse what a traced model holds that activity perturbation cannot train, with the module's name: a
    parameter outside a module, parameters of a module that is not a Conv2d or Linear layer (norms aside),
    a padding mode other than zeros, and one parameter at two sites."""
    for n in graph.nodes:
        if n.op == "get_attr" and isinstance(getattr_path(model, n.target), nn.Parameter):
            raise ValueError(
                f"parameter {n.target} is used outside a module; activity perturbation trains Conv2d and "
                "Linear layers only: wrap it in one, give a cut, or use zo-adam"
            )
    for n, m in modules.items():
        if not isinstance(m, SITE_LAYERS + UNTRAINED) and any(True for _ in m.parameters(recurse=False)):
            raise ValueError(
                f"module {n.target} ({type(m).__name__}) holds parameters activity perturbation cannot train "
                "(it trains Conv2d and Linear layers); give a cut or use zo-adam"
            )
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":  # the weight product assumes zero padding
            raise ValueError(f"module {n.target}: padding_mode={m.padding_mode!r} is not supported; use 'zeros'")
    # a site sets its layer's gradient: a layer (or a parameter) used at two sites would keep the last only
    owner: dict[int, str] = {}
    for n in (n for n in graph.nodes if isinstance(modules.get(n), SITE_LAYERS)):
        for p in modules[n].parameters(recurse=False):
            if id(p) in owner:
                what = "is called twice" if owner[id(p)] == n.target else f"shares a parameter with {owner[id(p)]}"
                raise ValueError(
                    f"module {n.target} {what}; activity perturbation sets a layer's gradient from one site, so "
                    "each Conv2d or Linear layer must be used once: give a cut or use zo-adam"
                )
            owner[id(p)] = n.target
