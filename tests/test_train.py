"""ddim train: tiny runs, exact resume, checkpoints that load, bad settings refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import ddim
from ddim.checkpoint import load
from ddim.data import sklearn_digits
from ddim.train import TrainConfig, _lr_at, diffusion_loss, train

TINY = {"base_channels": 8, "channel_mults": [1, 2], "num_heads": 2}


def cfg(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(
        data="digits",
        out=str(tmp_path / name),
        steps=4,
        batch_size=8,
        unet=TINY,
        checkpoint_every=2,
        sample_every=0,
        log_every=1,
        T=100,
        warmup=2,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_exact(tmp_path):
    data = sklearn_digits()
    train(cfg(tmp_path, "straight"), progress=False, data=data)
    train(cfg(tmp_path, "resumed", steps=2), progress=False, data=data)
    train(cfg(tmp_path, "resumed", steps=4), progress=False, data=data)
    a = load_file(tmp_path / "straight" / "state.safetensors")
    b = load_file(tmp_path / "resumed" / "state.safetensors")
    assert a.keys() == b.keys()
    assert any(k.startswith("opt.") for k in a) and "rng.data" in a and "rng.torch" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (
        load_file(tmp_path / "straight" / "model.safetensors").keys()
        == load_file(tmp_path / "resumed" / "model.safetensors").keys()
    )


def test_checkpoint_loads_and_samples(tmp_path):
    out = train(cfg(tmp_path, steps=2), progress=False)
    model, schedule, config = load(out)
    assert config["train"]["step"] == 2 and config["prediction"] == "epsilon"
    assert config["unet"]["num_classes"] == 10 and len(schedule) == 100
    x = ddim.sample(
        model, ddim.randn((2, 1, 8, 8), [0, 1]), schedule, steps=5, model_kwargs={"y": torch.tensor([1, 2])}
    )
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) == 3


@pytest.mark.parametrize("prediction,schedule", [("sample", "cosine"), ("v_prediction", "linear")])
def test_targets_and_schedules(tmp_path, prediction, schedule):
    out = train(cfg(tmp_path, steps=2, prediction=prediction, schedule=schedule, class_cond=False), progress=False)
    cfgj = json.loads((out / "config.json").read_text())
    assert cfgj["prediction"] == prediction and cfgj["schedule"]["name"] == schedule
    assert cfgj["unet"]["num_classes"] == 0


def test_sample_grid_written(tmp_path):
    out = train(cfg(tmp_path, steps=2, sample_every=2), progress=False)
    assert (out / "samples" / "step_0000002.png").is_file()


def test_resume_with_other_settings_refused(tmp_path):
    train(cfg(tmp_path, steps=2), progress=False)
    with pytest.raises(ValueError, match="different settings"):
        train(cfg(tmp_path, steps=4, prediction="v_prediction"), progress=False)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"prediction": "score"}, "prediction"),
        ({"schedule": "sigmoid"}, "schedule"),
        ({"steps": 0}, "steps"),
        ({"label_dropout": 1.0}, "label_dropout"),
        ({"lr": 0}, "lr"),
        ({"lr_decay_start": 4}, "lr_decay_start"),
        ({"lr_decay_start": -1}, "lr_decay_start"),
    ],
)
def test_bad_settings(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train(cfg(tmp_path, **kw), progress=False)


def test_loss_targets_are_the_definitions():
    """With a model that returns the exact target, the loss is zero for each parameterisation."""
    ab = ddim.NoiseSchedule.linear(10).alphas_cumprod
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 5, 9])
    a = ab[t].float().view(-1, 1, 1, 1)
    targets = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}
    for pred, target in targets.items():
        loss = diffusion_loss(lambda x, tt, target=target: target, x0, t, noise, ab, pred)
        assert loss.item() < 1e-12


def test_learning_rate_schedule():
    """Linear warm-up, a plateau, then (with lr_decay_start) a cosine tail reaching 0 at the last step."""
    flat = TrainConfig(steps=100, lr=1e-3, warmup=10)
    assert _lr_at(flat, 0) == pytest.approx(1e-4)
    assert _lr_at(flat, 9) == _lr_at(flat, 99) == pytest.approx(1e-3)
    tail = TrainConfig(steps=100, lr=1e-3, warmup=10, lr_decay_start=60)
    assert [_lr_at(tail, s) for s in (0, 59, 60)] == [_lr_at(flat, s) for s in (0, 59, 60)]
    assert _lr_at(tail, 80) == pytest.approx(0.5e-3)
    assert _lr_at(tail, 99) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    lrs = [_lr_at(tail, s) for s in range(60, 100)]
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


def test_init_fine_tunes_from_a_model(tmp_path):
    """--init starts raw and EMA weights from a model's weights; step count and optimizer start afresh."""
    data = sklearn_digits()
    base = train(cfg(tmp_path, "base", steps=2), progress=False, data=data)
    start, _, _ = load(base)
    tuned = cfg(tmp_path, "tuned", steps=1, init=str(base), lr=1e-9, label_dropout=0.5, seed=3)
    train(tuned, progress=False, data=data)
    state = load_file(tmp_path / "tuned" / "state.safetensors")
    model, _, config = load(tmp_path / "tuned")
    assert config["train"]["step"] == 1 and config["train"]["init"] == str(base)
    for name, p in start.state_dict().items():  # one step at lr 1e-9 barely moves the weights
        assert torch.allclose(model.state_dict()[name], p, atol=1e-6), name
        assert torch.allclose(state[f"model.{name}"], p, atol=1e-6), name
    fresh, _, _ = load(train(cfg(tmp_path, "fresh", steps=1, lr=1e-9, seed=3), progress=False, data=data))
    assert any(not torch.allclose(p, start.state_dict()[k], atol=1e-3) for k, p in fresh.state_dict().items())


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"unet": {**TINY, "base_channels": 16}}, "base_channels"),
        ({"prediction": "v_prediction"}, "predicts"),
        ({"schedule": "cosine"}, "schedule"),
        ({"T": 50}, "T=100"),
        ({"class_cond": False}, "num_classes"),
    ],
)
def test_init_that_does_not_fit_is_refused(tmp_path, kw, match):
    data = sklearn_digits()
    base = train(cfg(tmp_path, "base", steps=1), progress=False, data=data)
    with pytest.raises(ValueError, match=match):
        train(cfg(tmp_path, "tuned", init=str(base), **kw), progress=False, data=data)


def test_init_missing_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        train(cfg(tmp_path, init=str(tmp_path / "nowhere")), progress=False, data=sklearn_digits())
