"""ddim.edit: class swap, SDEdit and inpainting against what they are defined to be."""

from __future__ import annotations

import pytest
import torch

import ddim
from ddim.edit import class_swap, inpaint, sdedit, strength_timesteps
from ddim.generate import invert_images


@pytest.fixture(scope="module")
def loaded():
    return ddim.load()


@pytest.fixture(scope="module")
def digit(loaded):
    model, schedule, _ = loaded
    return ddim.sample(
        model, ddim.randn((2, 1, 28, 28), [5, 6]), schedule, steps=10, model_kwargs={"y": torch.tensor([7, 2])}
    )


def y(*labels):
    return {"y": torch.tensor(labels)}


def test_class_swap_to_the_same_class_is_the_ddim_reconstruction(loaded, digit):
    model, schedule, _ = loaded
    out, z = class_swap(model, schedule, digit, source_kwargs=y(7, 2), target_kwargs=y(7, 2), steps=6)
    ref = invert_images(model, schedule, digit, steps=6, labels=torch.tensor([7, 2]))
    assert torch.equal(z, ref["latents"]) and torch.equal(out, ref["reconstruction"])
    # another target decodes the same x_T to another image; given latents skip the inversion
    other, z2 = class_swap(model, schedule, digit, source_kwargs=y(7, 2), target_kwargs=y(1, 1), steps=6, latents=z)
    assert z2 is z and (other - out).abs().mean() > 0.05
    guided, _ = class_swap(model, schedule, digit, source_kwargs=y(7, 2), target_kwargs=y(1, 1), steps=6, latents=z,
                           uncond_kwargs=y(10, 10), guidance_scale=3.0)  # fmt: skip
    assert not torch.equal(guided, other)


def test_strength_keeps_the_asked_step_count(loaded):
    _, schedule, _ = loaded
    assert strength_timesteps(schedule, 10, "leading", 1.0) == list(range(900, -1, -100))  # = ddim.timesteps
    assert strength_timesteps(schedule, 10, "trailing", 1.0) == ddim.timesteps(schedule, 10, "trailing").tolist()
    # strength 0.3 selects the first 300 timesteps; 10 steps on them, as the spacing places 10 on 300
    assert strength_timesteps(schedule, 10, "leading", 0.3) == list(range(270, -1, -30))
    assert strength_timesteps(schedule, 4, "linspace", 0.3) == [299, 199, 100, 0]
    assert strength_timesteps(schedule, 1, "leading", 0.001) == [0]
    with pytest.raises(ValueError, match="at most 1 steps"):
        strength_timesteps(schedule, 10, "leading", 0.001)
    for bad in (0, 0.0, -0.5, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="strength"):
            strength_timesteps(schedule, 10, "leading", bad)


def test_sdedit_is_noise_to_the_level_then_sample(loaded, digit):
    model, schedule, _ = loaded
    ts = list(range(270, -1, -30))
    for eta in (0.0, 0.5):
        st: dict = {}
        out = sdedit(model, schedule, digit, 0.3, seeds=[1, 2], steps=10, eta=eta, model_kwargs=y(7, 2), stats=st)
        assert st["nfe"] == 10  # exactly the steps asked for
        ab = float(schedule.alphas_cumprod[270])
        x_t = ab**0.5 * digit + (1 - ab) ** 0.5 * ddim.randn(digit.shape, [1, 2])
        ref = ddim.sample(model, x_t, schedule, timesteps=ts, eta=eta, seeds=[1, 2], model_kwargs=y(7, 2))
        assert torch.equal(out, ref)
    weak = sdedit(model, schedule, digit, 0.1, seeds=[1, 2], steps=10, model_kwargs=y(7, 2))
    strong = sdedit(model, schedule, digit, 1.0, seeds=[1, 2], steps=10, model_kwargs=y(7, 2))
    assert (weak - digit).abs().mean() < (strong - digit).abs().mean()


def test_inpaint_keeps_the_known_region_and_is_ddim_inside(loaded, digit):
    model, schedule, _ = loaded
    kw = dict(seeds=[3, 4], steps=6, model_kwargs=y(1, 1))
    keep_all = inpaint(model, schedule, digit, torch.zeros(1, 1, 28, 28), **kw)
    assert torch.equal(keep_all, digit)
    # a full mask is plain DDIM from the seeds' noise (η = 0 and η > 0: the same noise stream)
    for eta in (0.0, 0.7):
        full = inpaint(model, schedule, digit, torch.ones(2, 1, 28, 28), eta=eta, **kw)
        ref = ddim.sample(model, ddim.randn(digit.shape, [3, 4]), schedule, steps=6, eta=eta, seeds=[3, 4],
                          model_kwargs=y(1, 1))  # fmt: skip
        torch.testing.assert_close(full, ref, atol=1e-4, rtol=0)
    half = torch.zeros(1, 1, 28, 28)
    half[..., 14:] = 1
    out = inpaint(model, schedule, digit, half, **kw)
    assert torch.equal(out[..., :14], digit[..., :14])
    assert (out[..., 14:] - digit[..., 14:]).abs().mean() > 0.05
    guided = inpaint(model, schedule, digit, half, guidance_scale=3.0, uncond_kwargs=y(10, 10), **kw)
    assert not torch.equal(guided, out) and torch.equal(guided[..., :14], digit[..., :14])


def test_inpaint_refuses_bad_masks(loaded, digit):
    model, schedule, _ = loaded
    with pytest.raises(ValueError, match="mask shape"):
        inpaint(model, schedule, digit, torch.ones(1, 1, 14, 14), seeds=[0, 1], steps=2)
    with pytest.raises(ValueError, match="mask values"):
        inpaint(model, schedule, digit, torch.full((1, 1, 28, 28), 2.0), seeds=[0, 1], steps=2)
    with pytest.raises(ValueError, match="mask must be"):
        inpaint(model, schedule, digit, torch.ones(28, 28), seeds=[0, 1], steps=2)
    with pytest.raises(ValueError, match="eta"):
        inpaint(model, schedule, digit, torch.ones(1, 1, 28, 28), seeds=[0, 1], steps=2, eta=-1.0)
    with pytest.raises(ValueError, match="resample"):
        inpaint(model, schedule, digit, torch.ones(1, 1, 28, 28), seeds=[0, 1], steps=2, resample=0)


def test_inpaint_resampling_and_bit_identical_outside(loaded, digit):
    """RePaint resampling makes (N-1)·r + 1 calls and changes the inside only; outside is x_0 bit for bit."""
    model, schedule, _ = loaded
    calls = []

    def counted(x, t, **kw):
        calls.append(1)
        return model(x, t, **kw)

    half = torch.zeros(1, 1, 28, 28)
    half[..., 9:20, 5:23] = 1
    kw = dict(seeds=[3, 4], steps=5, model_kwargs=y(1, 1))
    plain = inpaint(counted, schedule, digit, half, **kw)
    assert len(calls) == 5
    calls.clear()
    again = inpaint(counted, schedule, digit, half, resample=3, **kw)
    assert len(calls) == 4 * 3 + 1
    outside = half.expand_as(digit) == 0
    assert torch.equal(again[outside], digit[outside]) and torch.equal(plain[outside], digit[outside])
    assert not torch.equal(again, plain) and torch.isfinite(again).all()
    assert torch.equal(inpaint(model, schedule, digit, half, resample=3, **kw), again)  # seeded: reproducible
