"""Adaptive step selection (ddim.optimize_timesteps) on a closed-form Gaussian mixture: it must beat
the fixed spacings on noises it never saw, return a list that sample() and the CLI reuse, and refuse
what it cannot do."""

from __future__ import annotations

import pytest
import torch

import ddim
from ddim import GaussianMixture, NoiseSchedule
from ddim.optimize import trajectory_error

SPACINGS = ("logsnr", "karras", "trailing", "linspace")


@pytest.fixture(scope="module")
def setup():
    sched = NoiseSchedule.linear(1000)
    means = torch.tensor([[-0.5, 0.3], [0.6, -0.2], [0.1, 0.8]])
    mix = GaussianMixture(sched, means, torch.tensor([0.3, 0.4, 0.5]), torch.tensor([1.0, 2.0, 1.5]))
    train = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    test = torch.randn(512, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    exact = mix.ode_solve(test, sched.alphas_cumprod[999].item(), 1.0, 1000)
    return sched, mix, train, test, exact


@pytest.mark.parametrize("sampler, steps", [("ddim", 6), ("dpmpp_2m", 6), ("unipc", 5)])
def test_generalises_to_unseen_noises(setup, sampler, steps):
    sched, mix, train, test, exact = setup
    stats: dict = {}
    ts = ddim.optimize_timesteps(mix, sched, steps, train, sampler=sampler, stats=stats)
    fixed = {
        sp: trajectory_error(ddim.sample(mix, test, sched, steps=steps, spacing=sp, sampler=sampler), exact)
        for sp in SPACINGS
    }
    ours = trajectory_error(ddim.sample(mix, test, sched, timesteps=ts, sampler=sampler), exact)
    print(
        f"\n[optimize] {sampler} S={steps}: {ts}; unseen-noise RMS error {ours:.3e} vs {fixed}; {stats['evals']} runs"
    )
    assert stats["error"] < stats["start_error"]
    assert ours < 0.9 * min(fixed.values())  # beats the spacing it started from, and every other one


def test_result_is_a_plain_list_that_sample_reuses(setup):
    sched, mix, train, _, _ = setup
    stats: dict = {}
    ts = ddim.optimize_timesteps(mix, sched, 4, train, max_evals=40, stats=stats, reference_steps=100)
    assert type(ts) is list and all(type(t) is int for t in ts) and len(ts) == 4
    assert ts[0] == 999 and ts == sorted(set(ts), reverse=True) and ts[-1] >= 0
    assert ddim.check_timesteps(ts, sched.T).tolist() == ts
    ref = ddim.sample(mix, train, sched, steps=100, spacing="logsnr", sampler="dpmpp_3m")
    again = ddim.sample(mix, train, sched, timesteps=ts)
    assert trajectory_error(again, ref) == pytest.approx(stats["error"], rel=1e-12)
    # Cost accounting: the reference, then one sampler run per evaluated list.
    assert stats["nfe"] == 100 + stats["evals"] * ddim.nfe("ddim", 4)
    assert stats["evals"] <= 40 + len(SPACINGS)


def test_heun_counts_its_calls(setup):
    sched, mix, train, _, _ = setup
    stats: dict = {}
    ddim.optimize_timesteps(mix, sched, 3, train, sampler="heun", max_evals=10, stats=stats, reference=train * 0)
    assert stats["nfe"] == stats["evals"] * 5


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"sampler": "ddpm"}, ValueError, "deterministic"),
        ({"sampler": "dpmpp_2m_sde"}, ValueError, "deterministic"),
        ({"reference_sampler": "ddpm"}, ValueError, "deterministic"),
        ({"sampler": "dpm"}, ValueError, "valid samplers"),
        ({"eta": 0.5}, TypeError, "eta"),
        ({"timesteps": [999, 0]}, TypeError, "timesteps"),
        ({"init": ("leading",)}, ValueError, "T-1"),
        ({"init": ("cubic",)}, ValueError, "spacing"),
        ({"max_evals": -1}, ValueError, "max_evals"),
        ({"reference": torch.zeros(3, 2)}, ValueError, "reference"),
    ],
)
def test_refuses_bad_arguments(setup, kwargs, exc, word):
    sched, _, train, _, _ = setup

    def never(x, t):
        raise AssertionError("model called before validation finished")

    with pytest.raises(exc, match=word):
        ddim.optimize_timesteps(never, sched, 5, train, **kwargs)


def test_cli_prints_a_list_for_ddim_sample(tmp_path, capsys):
    from ddim.checkpoint import save_model
    from ddim.cli import run
    from ddim.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_heads=2, num_classes=4))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    save_model(tmp_path / "m", model, NoiseSchedule.linear(100), "epsilon", {"sampling": {"guidance": 2.0}})
    args = ["--model", str(tmp_path / "m"), "--steps", "4", "--n", "4", "--reference-steps", "20"]
    rc = run(["optimize-timesteps", *args, "--max-evals", "8", "--validate", "4", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    last = out.out.strip().splitlines()[-1]
    ts = [int(v) for v in last.split(",")]
    assert len(ts) == 4 and ts[0] == 99 and "unseen noises" in out.out
    rc = run(
        ["sample", "--model", str(tmp_path / "m"), "--timesteps", last, "--n", "2", "--out", str(tmp_path / "s.npz")]
    )
    assert rc == 0, capsys.readouterr().err
    assert run(["optimize-timesteps", "--model", str(tmp_path / "m"), "--sampler", "ddpm"]) == 2
    assert "ddpm" in capsys.readouterr().err
