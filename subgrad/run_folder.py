"""The run folder's files: one atomic-write helper for every writer in the package, and the checkpoint
format (save, load, find the latest).

A reader never sees a half-written file: :func:`atomic_write` lets the caller write a temporary file
beside the target (same folder, so the rename stays on one filesystem), flushes it to disk and renames
it over the target; if writing fails the target is untouched and the temporary file is removed.
torch is imported only by the functions that need it (the export tools use this module too).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Callable

#: Tag in every checkpoint dict; loaders refuse files without it.
CHECKPOINT_FORMAT = "subgrad-checkpoint-v1"


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, fsync it, rename it to ``path``.

    The temporary name keeps ``path``'s suffix (writers such as ``np.savez`` or ``fig.savefig`` pick the
    format from it).  Returns ``path``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save(obj, path: str | os.PathLike) -> pathlib.Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a subgrad checkpoint (``weights_only=True``) or raise a one-line error saying why not."""
    import torch

    path = pathlib.Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: all mean "not a usable checkpoint"
        raise ValueError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); it may be truncated or not a subgrad checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise ValueError(f"{path} is not a subgrad checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    return ckpt


def checkpoints(run: str | os.PathLike) -> list[pathlib.Path]:
    """The run's step checkpoints, oldest first (names are zero-padded step numbers)."""
    return sorted((pathlib.Path(run) / "checkpoints").glob("step-*.pt"))


def latest_checkpoint(run: str | os.PathLike) -> pathlib.Path:
    found = checkpoints(run)
    if not found:
        raise ValueError(f"no checkpoints in {pathlib.Path(run) / 'checkpoints'}; nothing to resume")
    return found[-1]


def versions() -> dict:
    """The versions a run or benchmark records: subgrad, torch, Python and (where installed) triton."""
    import platform

    import torch

    from . import __version__

    out = {"subgrad": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out
