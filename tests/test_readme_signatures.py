"""The reference's signature tables (docs/optimizers.md, docs/kernels.md, linked from the README) agree with
the code: every parameter a row names exists, every default it states is the real default, and a row
without ``...`` lists every parameter."""

import ast
import inspect
import pathlib
import re

import pytest

import subgrad.kernels as kernels
import subgrad.optim as optim

DOCS = [pathlib.Path(__file__).resolve().parents[1] / "docs" / name for name in ("optimizers.md", "kernels.md")]
ROW = re.compile(r"^\| `(\w+)\((.*?)\)` \|")  # a table row that starts with `name(arguments)`


def _rows() -> list[tuple[str, str]]:
    rows = [ROW.match(line) for doc in DOCS for line in doc.read_text().splitlines()]
    return [(m.group(1), m.group(2)) for m in rows if m]


def _split(arguments: str) -> list[str]:
    """Top-level comma split (defaults may hold parentheses or quoted commas)."""
    parts, depth, current, quoted = [], 0, "", False
    for ch in arguments:
        quoted ^= ch == '"'
        depth += (ch in "([") - (ch in ")]") if not quoted else 0
        if ch == "," and depth == 0 and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()] if current.strip() else parts


def _target(name: str):
    for module in (kernels, optim):
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"README names {name}() but neither subgrad.kernels nor subgrad.optim has it")


def test_readme_has_signature_rows():
    names = {name for name, _ in _rows()}
    assert {"perturb_", "zo_update_", "zo_estimate_", "sgd_step_", "adamw_step_", "ZOSGD", "ZOAdam", "HiZOO"} <= names


@pytest.mark.parametrize("name, arguments", _rows(), ids=[name for name, _ in _rows()])
def test_signature_row_matches_code(name, arguments):
    real = inspect.signature(_target(name)).parameters
    listed = []
    for token in _split(arguments):
        if token in ("*", "..."):
            continue
        pname, _, default = token.partition("=")
        pname = pname.strip()
        assert pname in real, f"README {name}(): no parameter {pname!r}; the code has {list(real)}"
        listed.append(pname)
        if default:
            first = default.replace("\\|", "|").split("|")[0].strip()
            try:
                stated = ast.literal_eval(first)
            except (ValueError, SyntaxError):
                continue  # not a literal (an expression in prose): nothing to compare
            actual = real[pname].default
            assert actual == stated, f"README {name}({pname}={first}) but the code's default is {actual!r}"
    if "..." not in arguments:  # "..." marks a row that lists only some parameters (or "as the row above")
        missing = [p for p in real if p not in listed and p != "self"]
        assert not missing, f"README {name}() omits {missing}; list them or mark the row with '...'"
