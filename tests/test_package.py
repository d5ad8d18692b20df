"""Install layout and command line."""

import importlib.util
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

import subgrad

pytestmark = pytest.mark.slow  # every test here builds and installs a wheel


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_namespaced_imports_and_no_top_level_kernels_or_export(tmp_path):
    """subgrad.kernels / subgrad.export import from an unrelated directory; bare names do not exist."""
    out = _python(
        "import importlib.util as u, subgrad.kernels, subgrad.export;"
        "print(u.find_spec('kernels'), u.find_spec('export'))",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"], out.stdout


def test_version_and_help(tmp_path):
    out = subprocess.run([sys.executable, "-m", "subgrad", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"subgrad {subgrad.__version__}"
    assert subgrad.__version__ != "0.0.0+unknown"
    out = subprocess.run([sys.executable, "-m", "subgrad", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "selfcheck" in out.stdout


def test_selfcheck_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "subgrad", "selfcheck", "--n", "1025"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("bit-identical") == 6 and "self-check passed" in out.stdout


def test_missing_onnxruntime_message(monkeypatch):
    import builtins

    from subgrad.export import MissingOnnxRuntimeError, require_onnxruntime

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    try:
        require_onnxruntime()
    except MissingOnnxRuntimeError as exc:
        assert "subgrad[cpu]" in str(exc) and "subgrad[gpu]" in str(exc)
    else:
        raise AssertionError("require_onnxruntime did not raise without onnxruntime")


REPO = pathlib.Path(__file__).resolve().parents[1]
CHECK_INSTALL = REPO / ".ci" / "check_install.py"


def _source_modules() -> dict:
    spec = importlib.util.spec_from_file_location("check_install", CHECK_INSTALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_modules(REPO)


def test_every_source_module_imports(tmp_path):
    """.ci/check_install.py walks the source tree and imports each module by its installed name."""
    out = subprocess.run(
        [sys.executable, str(CHECK_INSTALL), str(REPO)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    count = len(_source_modules())
    assert f"{count} of {count} modules imported" in out.stdout, out.stdout


def test_wheel_contains_every_source_module(tmp_path):
    """A wheel built from the repository ships exactly the source tree's modules, under subgrad.*.

    Built from a copy of the packaging inputs, so the repository gets no build/ or egg-info folders.
    A subpackage left out of the packaging (as subgrad.optim once was) fails here, not for a user.
    """
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("subgrad", "kernels", "export"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(tmp_path / "wheel"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("subgrad-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    shipped = {n for n in names if n.endswith(".py")}
    expected = {
        name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
        for name, path in _source_modules().items()
    }
    assert shipped == expected, (
        f"missing from the wheel: {sorted(expected - shipped)}; "
        f"in the wheel but not in the source tree: {sorted(shipped - expected)}"
    )
    assert "subgrad = subgrad.cli:main" in entry_points, entry_points
