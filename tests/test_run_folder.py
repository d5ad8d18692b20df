"""subgrad.run_folder: the one atomic-write helper every writer uses, and checkpoint discovery."""

import numpy as np
import pytest
import torch

from subgrad.run_folder import (
    atomic_save,
    atomic_write,
    atomic_write_text,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
)


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.onnx"
    atomic_write_text(target, "good")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_temporary_keeps_the_suffix_writers_choose_formats_by(tmp_path):
    """np.savez appends .npz to a name without it: the temporary must end in .npz already."""
    target = tmp_path / "cache.npz"
    atomic_write(target, lambda tmp: np.savez(tmp, a=np.arange(3)))
    assert np.load(target)["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]


def test_checkpoints_latest_and_refusals(tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        latest_checkpoint(tmp_path)
    for step in (2, 10, 7):
        atomic_save(
            dict(format="subgrad-checkpoint-v1", model={"w": torch.ones(1) * step}, step=step),
            tmp_path / "checkpoints" / f"step-{step:07d}.pt",
        )
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000002.pt", "step-0000007.pt", "step-0000010.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 10
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(tmp_path / "bad.pt")
    atomic_save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a subgrad checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
