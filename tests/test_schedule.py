import json
import math

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from ddim import NoiseSchedule


def _cumprod(betas: list[float]) -> list[float]:
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return out


def test_linear_hand_formula():
    s = NoiseSchedule.linear(10, 0.001, 0.1)
    betas = [0.001 + (0.1 - 0.001) * i / 9 for i in range(10)]
    assert s.alphas_cumprod.dtype == torch.float64 and s.T == len(s) == 10
    assert s.alphas_cumprod.tolist() == pytest.approx(_cumprod(betas), rel=1e-13)
    assert s.betas.tolist() == pytest.approx(betas, rel=1e-10)


def test_scaled_linear_hand_formula():
    s = NoiseSchedule.scaled_linear(8, 0.00085, 0.012)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    betas = [(lo + (hi - lo) * i / 7) ** 2 for i in range(8)]
    assert s.alphas_cumprod.tolist() == pytest.approx(_cumprod(betas), rel=1e-13)


def test_cosine_hand_formula_and_diffusers():
    T, s_off = 50, 0.008

    def f(u):
        return math.cos((u + s_off) / (1 + s_off) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    s = NoiseSchedule.cosine(T)
    assert s.alphas_cumprod.tolist() == pytest.approx(_cumprod(betas), rel=1e-12)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    torch.testing.assert_close(NoiseSchedule.cosine(1000).alphas_cumprod, ref, rtol=0, atol=2e-6)


def test_linear_equals_diffusers():
    ref = DDIMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    torch.testing.assert_close(NoiseSchedule.linear(1000).alphas_cumprod, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("make", [NoiseSchedule.linear, NoiseSchedule.scaled_linear, NoiseSchedule.cosine])
def test_rescale_zero_terminal_snr(make):
    s = make(1000)
    r = s.rescale_zero_terminal_snr()
    assert r.alphas_cumprod[-1].item() == 0.0
    assert r.alphas_cumprod[0].item() == pytest.approx(s.alphas_cumprod[0].item(), rel=1e-12)
    assert (r.alphas_cumprod[1:] <= r.alphas_cumprod[:-1]).all()
    assert r.log_snr()[-1].item() == -math.inf


def test_rescale_matches_diffusers():
    betas = NoiseSchedule.linear(1000).betas.float()
    ref = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0).double()
    ours = NoiseSchedule.linear(1000).rescale_zero_terminal_snr().alphas_cumprod
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "s",
    [
        NoiseSchedule.linear(100, 2e-4, 0.03),
        NoiseSchedule.scaled_linear(64),
        NoiseSchedule.cosine(30, s=0.01),
        NoiseSchedule.linear(20).rescale_zero_terminal_snr(),
        NoiseSchedule.from_betas([0.1, 0.2, 0.3]),
        NoiseSchedule.from_alphas_cumprod([0.9, 0.5, 0.1]),
    ],
    ids=["linear", "scaled_linear", "cosine", "rescaled", "betas", "alphas_cumprod"],
)
def test_to_dict_round_trip(s):
    d = json.loads(json.dumps(s.to_dict()))
    back = NoiseSchedule.from_dict(d)
    torch.testing.assert_close(back.alphas_cumprod, s.alphas_cumprod, rtol=0, atol=1e-15)
    assert back.to_dict() == s.to_dict()
