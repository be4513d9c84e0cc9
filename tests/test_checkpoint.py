"""Saving and loading models: round trip, corrupt and mismatched files."""

from __future__ import annotations

import json

import pytest
import torch

from ddim import NoiseSchedule
from ddim.checkpoint import load, save_model
from ddim.unet import UNet, UNetConfig

TINY = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_heads=2, num_classes=3)


def _saved(tmp_path, dtype=torch.float32):
    torch.manual_seed(0)
    model = UNet(TINY)
    for p in model.parameters():  # zero-initialised output layers would hide mistakes
        p.data.normal_(0, 0.1)
    save_model(
        tmp_path / "m", model, NoiseSchedule.cosine(50), "v_prediction", {"sampling": {"guidance": 1.5}}, dtype=dtype
    )
    return model.eval(), tmp_path / "m"


def test_round_trip(tmp_path):
    model, folder = _saved(tmp_path)
    loaded, schedule, config = load(folder)
    assert config["prediction"] == "v_prediction" and config["sampling"]["guidance"] == 1.5
    assert torch.equal(schedule.alphas_cumprod, NoiseSchedule.cosine(50).alphas_cumprod)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 40]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
    assert not loaded.training
    # the .safetensors file path works too
    assert load(folder / "model.safetensors")[2] == config


def test_fp16_storage(tmp_path):
    model, folder = _saved(tmp_path, torch.float16)
    loaded, _, _ = load(folder)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        assert torch.allclose(model(x, t), loaded(x, t), atol=1e-2)


def test_corrupt_and_mismatched(tmp_path):
    _, folder = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["unet"]["base_channels"] = 16
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match the architecture"):
        load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(folder)
    (folder / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a ddim model config"):
        load(folder)
    _, folder = _saved(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        load(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nothing")
