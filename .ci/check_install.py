"""Import every module of the installed subgrad, found by walking the source tree.

    python .ci/check_install.py REPO [--installed]

Walks ``subgrad/``, ``kernels/`` (installed as ``subgrad.kernels``) and ``export/`` (``subgrad.export``)
in REPO, imports each module by its installed name, and checks that no top-level ``kernels`` or ``export``
exists.  With ``--installed`` every module must also load from outside REPO (a regular install, not the
source tree).  Run it from a folder outside REPO, so the source tree is not on ``sys.path``.
Exit 0 when all is well; otherwise one line per problem and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pathlib
import sys

#: installed package name -> source folder (the layout README.md promises)
ROOTS = {"subgrad": "subgrad", "subgrad.kernels": "kernels", "subgrad.export": "export"}


def source_modules(repo: pathlib.Path) -> dict[str, pathlib.Path]:
    """{installed module name: source file} for every .py file under the three roots."""
    modules = {}
    for package, folder in ROOTS.items():
        root = repo / folder
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if any(part.startswith(".") or part == "__pycache__" for part in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=pathlib.Path)
    parser.add_argument("--installed", action="store_true", help="modules must load from outside REPO")
    args = parser.parse_args()
    repo = args.repo.resolve()
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU needed to import the kernels
    problems = []
    for bare in ("kernels", "export"):
        if importlib.util.find_spec(bare) is not None:
            problems.append(f"a top-level '{bare}' module is importable; it must only exist as subgrad.{bare}")
    modules, good = source_modules(repo), 0
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # report every failure, not just the first
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        where = pathlib.Path(module.__file__).resolve()
        if args.installed and where.is_relative_to(repo):
            problems.append(f"{name} loaded from the source tree ({where}), not from the installed package")
            continue
        good += 1
    for problem in problems:
        print(f"check_install: {problem}", file=sys.stderr)
    print(
        f"check_install: {good} of {len(modules)} modules imported"
        + (" from the installed package" if args.installed else "")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
