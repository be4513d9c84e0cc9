"""Sample-quality metrics: Fréchet distance, KID, precision/recall, cached reference features, the
feature extractors and FID's Inception-V3 (loaded from a file, as a user's weights would be)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ddim.evaluation.extractors import FeatureExtractor, module_extractor, quantize
from ddim.evaluation.inception import WEIGHTS_FILE, FIDInceptionV3, load_fid_inception
from ddim.evaluation.metrics import fid, floor_metrics, kid, precision_recall, reference_features
from ddim.metrics import frechet_distance


def gauss(n, d=8, shift=0.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# ------------------------------------------------------------------ Fréchet distance and KID
def test_fid_matches_hand_formula_and_closed_form():
    a, b = gauss(400, seed=1), gauss(300, shift=0.5, seed=2)
    assert fid(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    # Same covariance, means apart by δ per dimension: FD = D δ² (plus sampling noise in the covariance).
    big_a, big_b = gauss(20000, d=4, seed=3), gauss(20000, d=4, shift=1.0, seed=4)
    assert fid(big_a, big_b) == pytest.approx(4.0, abs=0.1)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-8)


def test_kid_seeded_near_zero_for_same_distribution_and_grows_with_shift():
    a, b = gauss(300, seed=1), gauss(300, seed=2)
    k1 = kid(a, b, subset_size=100, seed=0)
    assert k1 == kid(a, b, subset_size=100, seed=0)  # seeded subsets
    assert abs(k1[0]) < 0.05
    far = kid(gauss(300, shift=1.0, seed=3), b, subset_size=100)[0]
    assert far > 10 * abs(k1[0]) and far > 0.5
    # subset size is capped at the smaller set
    assert np.isfinite(kid(a[:20], b, subset_size=1000)[0])


def test_precision_recall():
    a = gauss(200, seed=1)
    assert precision_recall(a, a) == (1.0, 1.0)
    p, r = precision_recall(gauss(200, shift=50.0, seed=2), a)
    assert (p, r) == (0.0, 0.0)
    # Samples collapsed onto a small part of the data: high precision, low recall.
    flat = gauss(500, d=2, seed=3)
    p, r = precision_recall(flat[flat[:, 0] > 1], flat)
    assert p > 0.8 and r < 0.4
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(a[:3], a)


# ------------------------------------------------------------------ reference features
class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x.flatten(1))


def test_reference_cached_by_data_and_extractor(tmp_path):
    torch.manual_seed(0)
    module = Counting()
    ext = module_extractor(module, "counting")
    images = torch.rand(30, 1, 4, 4) * 2 - 1
    r1 = reference_features(images, ext, name="toy", cache_dir=tmp_path)
    calls = module.calls
    r2 = reference_features(images, ext, name="toy", cache_dir=tmp_path)
    assert module.calls == calls  # read from the cache
    assert r1.key == r2.key and torch.equal(r1.features, r2.features)
    np.testing.assert_allclose(r2.mu, r1.features.double().mean(0).numpy())
    files = list((tmp_path / "reference").glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("toy-") and "counting-" in files[0].name
    # Other images or other weights: another key.
    r3 = reference_features(images.flip(0)[:20], ext, name="toy", cache_dir=tmp_path)
    assert r3.key != r1.key
    module.lin.weight.data += 1
    ext2 = module_extractor(module, "counting")
    assert reference_features(images, ext2, name="toy", cache_dir=tmp_path).key != r1.key
    # The floor: n images of the reference itself score near-perfect precision.
    assert floor_metrics(r1, 20)["precision"] > 0.7


# ------------------------------------------------------------------ extractors
def test_extractor_prepares_channels_size_range():
    ext = FeatureExtractor(nn.Flatten(), "flat", "flat-0", channels=3, size=4, unit_range=True)
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    prepared = ext.prepare(x)
    assert prepared.shape == (1, 3, 4, 4) and 0 <= prepared.min() and prepared.max() <= 1
    assert torch.equal(prepared[:, 0], prepared[:, 2])
    assert ext(x).shape == (1, 48)
    # 8-bit quantisation: idempotent, and what a PNG of the image would hold
    q = quantize(torch.rand(2, 1, 5, 5) * 2 - 1)
    assert torch.equal(quantize(q), q)
    assert torch.allclose((q + 1) * 127.5, ((q + 1) * 127.5).round(), atol=1e-4)


def test_extractor_rejects_wrong_output_shape():
    ext = module_extractor(nn.Identity(), "identity")
    with pytest.raises(ValueError, match="expected \\[B, D\\]"):
        ext(torch.zeros(2, 1, 4, 4))


def test_classifier_extractor_features_and_accuracy():
    from ddim.data import mnist5k_split
    from ddim.evaluation.extractors import classifier_extractor

    ext = classifier_extractor()
    data = mnist5k_split("holdout")
    feats, preds = ext.features_and_predictions(data.images[:100])
    assert feats.shape == (100, 128)
    assert (preds == data.labels[:100]).float().mean() > 0.9
    # an 8×8 RGB image is converted (luminance, resized to 28)
    assert ext(torch.zeros(2, 3, 8, 8)).shape == (2, 128)


# ------------------------------------------------------------------ Inception-V3
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised FID Inception-V3 saved as pytorch-fid's file is (a state dict .pth)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # as the 2019 file
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(state, path)
    return path, net.eval()


def test_inception_layout_matches_the_fid_weights_file():
    keys = FIDInceptionV3().state_dict()
    # names and shapes of pytorch-fid's pt_inception-2015-12-05 file (a few from each part)
    assert keys["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert keys["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert keys["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert keys["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert keys["fc.weight"].shape == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in keys)
    n_params = sum(v.numel() for k, v in keys.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert n_params == 23_850_960


def test_inception_extractor_from_file(inception_file):
    from ddim.evaluation.extractors import inception_extractor

    path, net = inception_file
    ext = inception_extractor(path)
    x = torch.rand(2, 1, 28, 28) * 2 - 1  # grayscale, model space: repeated to RGB, resized to 299
    feats = ext(x)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    with torch.inference_mode():
        expected = net(ext.prepare(x))
    torch.testing.assert_close(feats, expected)
    assert ext.key.startswith("inception-")


def test_inception_missing_or_wrong_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE) as e:
        load_fid_inception(tmp_path / "nope.pth")
    assert "--inception-weights" in str(e.value) and "nothing is downloaded" in str(e.value)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="do not fit"):
        load_fid_inception(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot be read"):
        load_fid_inception(junk)
