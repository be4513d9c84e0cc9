"""Any tensor shape: samplers, inversion and seeds on 1-D signals [B, C, L] and 3-D video [B, C, F, H, W].

Correctness comes from closed-form Gaussian data (the exact ε* acts per element, so a sample's shape
cannot matter: every sampler must give the same numbers on [B, C, L], [B, C, H, W] and
[B, C, F, H, W] views of the same values, and land on the exact ODE solution). The U-Net's 1-D and
3-D variants are trained a few steps through ``ddim train`` and sampled with ``ddim sample``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ddim
from ddim.cli import run
from ddim.noise import randn
from ddim.sampling import SAMPLERS
from ddim.unet import UNet, UNetConfig

B = 3
SHAPES = {"1-D": (B, 2, 48), "2-D": (B, 2, 6, 8), "3-D": (B, 2, 3, 4, 4)}  # 96 values per sample each
NOISY = {"ddim": 1.0, "ddpm": 1.0, "dpmpp_2m_sde": 0.0}  # samplers that draw step noise (with this η)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_gives_the_same_numbers_in_every_shape(sampler, gaussian, linear):
    seeds = [11, 12, 13]
    eta = NOISY.get(sampler, 0.0)
    out = {}
    for name, shape in SHAPES.items():
        x_T = randn(shape, seeds)  # the same values in every shape: one generator per sample
        out[name] = ddim.sample(gaussian.eps, x_T, linear, steps=10, sampler=sampler, eta=eta, seeds=seeds)
        assert out[name].shape == shape and torch.isfinite(out[name]).all()
    flat = {k: v.reshape(B, -1) for k, v in out.items()}
    torch.testing.assert_close(flat["1-D"], flat["2-D"], rtol=0, atol=1e-6)
    torch.testing.assert_close(flat["3-D"], flat["2-D"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "dpmpp_3m", "heun", "plms", "unipc"])
@pytest.mark.parametrize("name", ["1-D", "3-D"])
def test_deterministic_samplers_converge_to_the_exact_ode_solution(sampler, name, gaussian, linear):
    x_T = randn(SHAPES[name], [0, 1, 2]).double()
    exact = gaussian.ode_solution(x_T, linear.alphas_cumprod[999].item(), 1.0)
    errors = [
        (ddim.sample(gaussian.eps, x_T, linear, steps=s, spacing="trailing", sampler=sampler) - exact).abs().max()
        for s in (10, 25, 100)
    ]
    # first-order DDIM/Euler: 0.39, 0.17, 0.047; the higher-order solvers reach 0.001-0.011 at 100 steps
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05 and errors[2] < errors[1] / 3, errors


@pytest.mark.parametrize("name", ["1-D", "3-D"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m_sde"])
def test_a_seed_gives_the_same_sample_in_any_batch(name, sampler, gaussian, linear):
    shape, seeds = SHAPES[name], [5, 6, 7]
    eta = NOISY[sampler]
    whole = ddim.sample(gaussian.eps, randn(shape, seeds), linear, steps=8, sampler=sampler, eta=eta, seeds=seeds)
    for i, s in enumerate(seeds):
        x_T = randn((1, *shape[1:]), [s])
        one = ddim.sample(gaussian.eps, x_T, linear, steps=8, sampler=sampler, eta=eta, seeds=[s])
        torch.testing.assert_close(one[0], whole[i], rtol=0, atol=1e-6)
    other = ddim.sample(gaussian.eps, randn(shape, seeds), linear, steps=8, sampler=sampler, eta=eta, seeds=[8, 9, 10])
    assert not torch.allclose(other, whole)  # the step noise does come from the seeds


@pytest.mark.parametrize("name", ["1-D", "3-D"])
def test_inversion_round_trip_error_falls_with_steps(name, gaussian, linear):
    g = torch.Generator().manual_seed(3)
    x0 = gaussian.mu + gaussian.s * torch.randn(SHAPES[name], dtype=torch.float64, generator=g)
    errors = []
    for steps in (10, 50, 200):
        x_T = ddim.invert(gaussian.eps, x0, linear, steps=steps)
        assert x_T.shape == x0.shape
        errors.append(((ddim.sample(gaussian.eps, x_T, linear, steps=steps) - x0) ** 2).mean().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < errors[0] / 20, errors


def test_stochastic_samples_have_the_data_distribution_in_3d(gaussian, linear):
    x_T = randn((4, 2, 4, 16, 16), range(4)).double()
    x0 = ddim.sample(gaussian.eps, x_T, linear, steps=500, eta=1.0, seeds=range(4))
    assert x0.mean().item() == pytest.approx(gaussian.mu, abs=0.01)
    assert x0.std().item() == pytest.approx(gaussian.s, abs=0.015)


# ------------------------------------------------------------------ the U-Net in 1-D and 3-D
@pytest.mark.parametrize(
    "dims, shape, extra",
    [(1, (2, 3, 16), {}), (2, (2, 3, 8, 8), {}), (3, (2, 3, 5, 8, 8), {"frames": 5})],
)
def test_unet_takes_signals_images_and_video(dims, shape, extra):
    torch.manual_seed(0)
    cfg = UNetConfig(
        image_size=shape[-1], in_channels=3, base_channels=8, channel_mults=(1, 2), num_heads=2, num_classes=2,
        dims=dims, **extra,
    )  # fmt: skip
    model = UNet(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(shape)
    y0 = model(x, torch.tensor([3, 9]), torch.tensor([0, 1]))
    y1 = model(x, torch.tensor([3, 9]), torch.tensor([1, 1]))
    assert y0.shape == shape and cfg.sample_shape == shape[1:]
    assert not torch.allclose(y0[0], y1[0]) and torch.allclose(y0[1], y1[1])  # the class reaches the output
    assert ("dims" in cfg.to_dict()) == (dims != 2)  # image configs are written as before
    assert UNetConfig(**cfg.to_dict()) == cfg


def test_unet_config_refuses_bad_dims():
    with pytest.raises(ValueError, match="dims"):
        UNetConfig(dims=4)
    with pytest.raises(ValueError, match="frames"):
        UNetConfig(dims=3)
    with pytest.raises(ValueError, match="frames"):
        UNetConfig(dims=1, frames=4)


def _wave_data(path, shape, n=24):
    """Labelled smooth waves in [-1, 1] shaped [n, *shape] (two classes: two frequencies)."""
    labels = np.arange(n) % 2
    pos = np.linspace(0, 2 * np.pi, int(np.prod(shape[1:])))
    waves = [0.8 * np.sin((1 + c) * pos + 0.3 * i) for i, c in enumerate(labels)]
    data = np.stack([np.broadcast_to(w.reshape(shape[1:]), shape) for w in waves]).astype(np.float32)
    np.savez(path, data=data, labels=labels)
    return str(path)


@pytest.mark.parametrize("name, shape", [("1-D", (2, 32)), ("3-D", (1, 3, 8, 8))])
def test_train_and_sample_signals_and_video(tmp_path, capsys, name, shape):
    data = _wave_data(tmp_path / "data.npz", shape)
    run_dir = tmp_path / "run"
    args = ["train", "--data", data, "--out", str(run_dir), "--steps", "3", "--batch", "4", "--T", "50"]
    args += ["--base-channels", "8", "--channel-mults", "1,2", "--sample-every", "0", "--checkpoint-every", "0"]
    assert run(args) == 0, capsys.readouterr().err
    model, _, config = ddim.load(run_dir)
    assert model.config.sample_shape == shape and model.config.dims == len(shape) - 1
    assert config["unet"]["dims"] == len(shape) - 1
    out = tmp_path / "s.npz"
    base = ["sample", "--model", str(run_dir), "--steps", "4", "-n", "3", "--class", "0,1", "--no-progress"]
    assert run(base + ["--out", str(out)]) == 0, capsys.readouterr().err
    with np.load(out) as z:
        assert z["samples"].shape == (3, *shape) and z["samples"].dtype == np.float32
        assert np.isfinite(z["samples"]).all() and z["labels"].tolist() == [0, 1, 0]
        first = z["samples"]
    one = tmp_path / "one.npz"  # seed 2 alone gives the third sample again
    assert run(base[:5] + ["-n", "1", "--seed", "2", "--class", "0", "--no-progress", "--out", str(one)]) == 0
    with np.load(one) as z:
        np.testing.assert_allclose(z["samples"][0], first[2], atol=1e-5)
    capsys.readouterr()
    assert run(base + ["--out", str(tmp_path / "s.png")]) == 2
    assert "not images: --out must end in .npz" in capsys.readouterr().err


def test_bad_signal_data_is_refused(tmp_path, capsys):
    np.savez(tmp_path / "loud.npz", data=np.full((4, 1, 16), 2.0, dtype=np.float32))
    assert run(["train", "--data", str(tmp_path / "loud.npz"), "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "[-1, 1]" in capsys.readouterr().err
    np.savez(tmp_path / "flat.npz", data=np.zeros((4, 16), dtype=np.float32))
    assert run(["train", "--data", str(tmp_path / "flat.npz"), "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "[N, C, L]" in capsys.readouterr().err
