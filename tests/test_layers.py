"""The house rules, checked: imports go one way (pyproject.toml's ``[tool.importlinter]`` layers, run by
import-linter), no alias modules, no module of subgrad/ or export/ over 400 lines.  Fast tier.

import-linter reads a package from the filesystem, and the source tree maps three folders into one package
(``kernels/`` is ``subgrad.kernels``, ``export/`` is ``subgrad.export``), so the contract is checked on a copy
laid out as the package installs.
"""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"subgrad": ROOT / "subgrad", "subgrad/kernels": ROOT / "kernels", "subgrad/export": ROOT / "export"}
MAX_LINES = 400


def installed_layout(dest: pathlib.Path) -> pathlib.Path:
    for inside, folder in FOLDERS.items():
        shutil.copytree(folder, dest / inside, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def lint_imports(tree: pathlib.Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    command = [
        sys.executable,
        "-c",
        "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
    ]
    return subprocess.run(
        [*command, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra: pip install -e '.[cpu,dev]'")
    return installed_layout(tmp_path_factory.mktemp("layout"))


def test_imports_go_one_way(tree):
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize(
    "module, line, local",
    [
        ("subgrad/kernels/sgd.py", "from subgrad.optim import SGD", False),  # a kernel reaching up
        ("subgrad/training/run_setup.py", "from subgrad.export import exporter", False),  # training meets export
        ("subgrad/optim/activity.py", "from subgrad.models import LeNet", False),  # the optimizer knows the zoo
        ("subgrad/export/validate.py", "from subgrad.training import config", True),  # hidden in a function
    ],
)
def test_a_wrong_way_import_is_caught(tmp_path, tree, module, line, local):
    broken = installed_layout(tmp_path / "broken")
    path = broken / module
    path.write_text(path.read_text() + (f"\n\ndef _probe():\n    {line}\n" if local else f"\n{line}\n"))
    result = lint_imports(broken)
    assert result.returncode != 0 and "1 broken" in result.stdout, result.stdout[-2000:]


def python_files(folders=None):
    for folder in folders or FOLDERS.values():
        yield from sorted(folder.rglob("*.py"))


def test_no_alias_modules():
    """A module is one name: none replaces itself in sys.modules or answers unknown names through a module
    ``__getattr__`` (the one exception: ``subgrad/__init__.py`` loads torch-backed names on first use, so
    that ``import subgrad`` works where only the deploy runtime's dependencies are installed)."""
    offenders = []
    for path in python_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and ast.unparse(node) == "sys.modules[__name__]":
                offenders.append(f"{path.relative_to(ROOT)}: replaces itself in sys.modules")
        module_getattr = any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body)
        if module_getattr and path != ROOT / "subgrad" / "__init__.py":
            offenders.append(f"{path.relative_to(ROOT)}: module-level __getattr__")
    assert not offenders, "\n".join(offenders)


def test_no_module_over_the_line_bound():
    """subgrad/ and export/ (a kernel file keeps its kernel, launcher and twin together, whatever its length)."""
    files = python_files((ROOT / "subgrad", ROOT / "export"))
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"split these by what they do (bound {MAX_LINES} lines):\n" + "\n".join(long)
