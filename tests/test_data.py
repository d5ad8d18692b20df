"""subgrad.data: every accepted layout on small fixtures, the real archive, errors, the device loader."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import real_archive
from subgrad.data import DataError, DeviceLoader, load_cifar10

CLASSES = ["cat", "dog", "ship"]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tree(root, train=4, test=2, classes=CLASSES):
    for split, count in (("train", train), ("test", test)):
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i:04d}.png").write_bytes(_png(ci * 100 + i + (50 if split == "test" else 0)))
    return root


def _tar(tree_parent, path, arcname="cifar"):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree_parent, arcname=arcname)
    return path


def _check(ds, train=4, test=2):
    assert ds.classes == tuple(CLASSES)
    assert ds.train_images.shape == (train * 3, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (test * 3, 32, 32, 3)
    assert ds.train_labels.tolist() == [c for c in range(3) for _ in range(train)]
    # pixels survive exactly (PNG is lossless): first training image of class 'dog'
    expected = np.asarray(Image.open(io.BytesIO(_png(100))).convert("RGB"))
    assert np.array_equal(ds.train_images[train], expected)


def test_image_folder_tree(tmp_path):
    _check(load_cifar10(_tree(tmp_path / "data")))


def test_image_folder_one_level_down(tmp_path):
    _tree(tmp_path / "data" / "cifar10")
    _check(load_cifar10(tmp_path / "data"))


def test_tar_gz_of_tree_and_cache_reuse(tmp_path, monkeypatch):
    archive = _tar(_tree(tmp_path / "tree"), tmp_path / "c.tar.gz")
    _check(load_cifar10(archive))
    import subgrad.data as D

    monkeypatch.setattr(D, "_from_tar", lambda p: (_ for _ in ()).throw(AssertionError("decoded again")))
    _check(load_cifar10(archive))  # served from the cache


def test_torchvision_folder(tmp_path):
    root = tmp_path / "tv" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = list(range(4))
        batches[name] = data
        with open(root / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    ds = load_cifar10(tmp_path / "tv")
    assert ds.train_images.shape == (20, 32, 32, 3) and ds.test_images.shape == (4, 32, 32, 3)
    assert np.array_equal(ds.train_images[0], batches["data_batch_1"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert len(ds.classes) == 10


@pytest.mark.slow  # the real archive
def test_real_archive():
    ds = load_cifar10(real_archive())
    assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.train_labels).tolist() == [5000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    mean, std = ds.channel_stats()
    assert all(0.4 < m < 0.5 for m in mean) and all(0.2 < s < 0.3 for s in std)


# -- errors -----------------------------------------------------------------------------------------
def test_missing_path_without_download(tmp_path):
    with pytest.raises(DataError, match="does not exist; expected a .tar.gz"):
        load_cifar10(tmp_path / "nowhere", download=False)


def test_download_without_network(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="downloading CIFAR-10 there failed .*without network, point --data at"):
        load_cifar10(tmp_path / "data")


def test_archive_with_wrong_layout(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    archive = _tar(tmp_path / "junk", tmp_path / "junk.tar.gz")
    with pytest.raises(DataError, match="has no train/<class>/ image folders"):
        load_cifar10(archive)


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"not a tarball at all")
    with pytest.raises(DataError, match="not a tar archive"):
        load_cifar10(tmp_path / "x.tar.gz")


def test_missing_class_folder(tmp_path):
    root = _tree(tmp_path / "data")
    for f in (root / "test" / "ship").iterdir():
        f.unlink()
    (root / "test" / "ship").rmdir()
    with pytest.raises(DataError, match="class folder test/ship missing"):
        load_cifar10(root)


def test_unreadable_image_is_named(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "train" / "dog" / "0002.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="unreadable image .*dog/0002.png"):
        load_cifar10(root)


def test_unknown_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not in a known layout"):
        load_cifar10(tmp_path / "empty")


# -- device loader ----------------------------------------------------------------------------------
def _loader(device, **kw):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(50) % 10
    return DeviceLoader(images, labels, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 8, device, **kw), images, labels


def test_plain_batches_are_normalised_in_order(device):
    loader, images, labels = _loader(device)
    x, y = next(loader.epoch(0))
    expected = (torch.from_numpy(images[:8]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert torch.allclose(x.cpu(), expected, atol=1e-5) and y.tolist() == labels[:8].tolist()
    assert len(loader) == 7 and sum(1 for _ in loader.epoch(0)) == 7


def test_order_and_augmentation_are_functions_of_seed_epoch_batch(device):
    a, images, _ = _loader(device, augment=True, shuffle=True, drop_last=True, order_seed=3, augment_seed=4)
    b, _, _ = _loader(device, augment=True, shuffle=True, drop_last=True, order_seed=3, augment_seed=4)
    batches = list(a.epoch(2))
    assert len(batches) == 6
    for i in (0, 3, 5):  # random access (resume mid-epoch) gives the same batch
        xb, yb = b.batch(2, i)
        assert torch.equal(xb, batches[i][0]) and torch.equal(yb, batches[i][1])
    assert not torch.equal(a.order(2), a.order(3))
    # augmentation: crops of the reflect-padded image, some flipped; values stay within the image's range
    plain, _, _ = _loader(device, shuffle=True, drop_last=True, order_seed=3)
    xp, yp = plain.batch(2, 0)
    xa, ya = a.batch(2, 0)
    assert torch.equal(yp, ya) and not torch.equal(xp, xa)
    # every augmented image is one of the 81 crops of its reflect-padded original, flipped or not
    padded = torch.nn.functional.pad(xp, (4, 4, 4, 4), mode="reflect")
    flipped = 0
    for img, pad in zip(xa, padded):
        crops = [c for dy in range(9) for dx in range(9) for c in (pad[:, dy : dy + 32, dx : dx + 32],)]
        plain_hit = any(torch.equal(img, c) for c in crops)
        flip_hit = any(torch.equal(img, c.flip(2)) for c in crops)
        assert plain_hit or flip_hit
        flipped += int(flip_hit and not plain_hit)
    assert 0 < flipped < len(xa)
