"""Install layout and command line."""
import subprocess
import sys

import subgrad


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_namespaced_imports_and_no_top_level_kernels_or_export(tmp_path):
    """subgrad.kernels / subgrad.export import from an unrelated directory; bare names do not exist."""
    out = _python("import importlib.util as u, subgrad.kernels, subgrad.export;"
                  "print(u.find_spec('kernels'), u.find_spec('export'))", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"], out.stdout


def test_version_and_help(tmp_path):
    out = subprocess.run([sys.executable, "-m", "subgrad", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"subgrad {subgrad.__version__}"
    assert subgrad.__version__ != "0.0.0+unknown"
    out = subprocess.run([sys.executable, "-m", "subgrad", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "selfcheck" in out.stdout


def test_selfcheck_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "subgrad", "selfcheck", "--n", "1025"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=600)
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
