"""Data sources and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddim.data import image_folder, load_data, mnist5k, mnist5k_split, npz_images, sklearn_digits


def test_mnist5k_and_holdout():
    full = mnist5k()
    assert full.images.shape == (5000, 1, 28, 28) and full.images.min() == -1 and full.images.max() == 1
    train, held = mnist5k_split("train"), mnist5k_split("holdout")
    assert len(train) == 4500 and len(held) == 500
    assert torch.equal(held.labels.bincount(), torch.full((10,), 50))
    # disjoint: no held-out image appears among the training images
    tr = {bytes(x.numpy().tobytes()) for x in (train.images * 127.5).round().to(torch.int16)}
    assert not any(bytes(x.numpy().tobytes()) in tr for x in (held.images * 127.5).round().to(torch.int16)[:50])
    assert load_data("mnist").source["subset"] == "train"


def test_sklearn_digits():
    d = sklearn_digits()
    assert d.images.shape == (1797, 1, 8, 8) and d.num_classes == 10
    assert d.images.min() >= -1 and d.images.max() <= 1


def _png(path, size, mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_folder_with_classes_resized_and_cropped(tmp_path):
    _png(tmp_path / "cat" / "a.png", (40, 20))
    _png(tmp_path / "cat" / "b.jpg", (16, 16))
    _png(tmp_path / "dog" / "c.png", (20, 50), value=255)
    d = image_folder(tmp_path, 16)
    assert d.images.shape == (3, 1, 16, 16) and d.class_names == ["cat", "dog"]
    assert d.labels.tolist() == [0, 0, 1]
    assert torch.allclose(d.images[2], torch.ones(1, 16, 16))


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        image_folder(tmp_path / "empty", 8)
    bad = tmp_path / "bad"
    _png(bad / "ok.png", (8, 8))
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        image_folder(bad, 8)
    mixed = tmp_path / "mixed"
    _png(mixed / "g.png", (8, 8))
    _png(mixed / "c.png", (8, 8), mode="RGB")
    with pytest.raises(ValueError, match="mixes grayscale and colour"):
        image_folder(mixed, 8)
    with pytest.raises(ValueError, match="does not exist"):
        load_data(str(tmp_path / "nowhere"))


def test_npz(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, images=np.zeros((5, 6, 6), np.uint8), labels=np.arange(5))
    d = npz_images(p)
    assert d.images.shape == (5, 1, 6, 6) and d.labels.tolist() == [0, 1, 2, 3, 4] and d.num_classes == 5
    np.savez(p, pixels=np.zeros((5, 6, 6), np.uint8))
    with pytest.raises(ValueError, match="no array named 'images'"):
        npz_images(p)
    np.savez(p, images=np.zeros((5, 6, 6, 2), np.uint8))
    with pytest.raises(ValueError, match="C in"):
        npz_images(p)
    np.savez(p, images=np.zeros((5, 6, 6), np.uint8), labels=np.arange(4))
    with pytest.raises(ValueError, match="'labels' must have shape"):
        npz_images(p)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        npz_images(tmp_path / "junk.npz")
