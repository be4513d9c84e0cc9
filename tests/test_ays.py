"""Align Your Steps' KL upper bound (ddim.ays) on a closed-form mixture: the dynamic programme finds the exact
optimum on its grid, the optimum holds on data it never saw, and a model's shipped lists serve --spacing optimized."""

from __future__ import annotations

import itertools

import pytest
import torch

import ddim
from ddim import GaussianMixture, NoiseSchedule
from ddim.ays import klub, klub_table, klub_timesteps, optimized_timesteps
from ddim.diffusers_io import sampling_kwargs


@pytest.fixture(scope="module")
def mixture():
    sched = NoiseSchedule.linear(1000)
    means = torch.tensor([[-0.5, 0.3], [0.6, -0.2], [0.1, 0.8]])
    return sched, GaussianMixture(sched, means, torch.tensor([0.3, 0.4, 0.5]), torch.tensor([1.0, 2.0, 1.5]))


def test_dynamic_programme_is_the_exact_optimum(mixture):
    sched, mix = mixture
    table = klub_table(mix, sched, mix.sample_data(64, seed=3), grid=12)
    assert table.timesteps[0] == 999 and table.timesteps[-1] == 0
    for steps in (1, 2, 3, 4):
        brute = min(table([0, *c]) for c in itertools.combinations(range(1, 12), steps - 1))
        ts = klub_timesteps(table, steps)
        assert len(ts) == steps and ts[0] == 999 and ts == sorted(set(ts), reverse=True)
        assert klub(table, ts) == pytest.approx(brute, rel=1e-12)
    with pytest.raises(ValueError, match="not on the grid"):
        klub(table, [999, 500])
    with pytest.raises(ValueError, match="steps must be"):
        klub_timesteps(table, 13)


def test_the_optimum_holds_on_data_it_never_saw(mixture):
    sched, mix = mixture
    train = klub_table(mix, sched, mix.sample_data(128, seed=3), grid=60, seed=0)
    held = klub_table(mix, sched, mix.sample_data(512, seed=4), grid=60, seed=1)
    grid = train.timesteps
    for steps in (5, 10):
        ours = klub(held, klub_timesteps(train, steps))
        for spacing in ("logsnr", "karras", "trailing", "linspace"):
            # the fixed spacing snapped to the grid (distinct levels)
            fixed = ddim.timesteps(sched, steps, spacing)
            snapped = sorted({int(grid[(grid - t).abs().argmin()]) for t in fixed.tolist()}, reverse=True)
            if len(snapped) == steps and snapped[0] == 999:
                assert ours < klub(held, snapped), (steps, spacing)


def test_a_model_config_serves_spacing_optimized(linear):
    config = {"sampling": {"optimized_timesteps": {"5": [999, 400, 100, 20, 3]}}, "prediction": "epsilon"}
    assert optimized_timesteps(config, 5) == [999, 400, 100, 20, 3]
    kw = sampling_kwargs(config, linear, 5, "optimized")
    assert kw["timesteps"] == [999, 400, 100, 20, 3]
    with pytest.raises(ValueError, match=r"optimised timesteps for steps 5, not 6"):
        sampling_kwargs(config, linear, 6, "optimized")
    with pytest.raises(ValueError, match="steps none"):
        optimized_timesteps({"sampling": {}}, 5)


def test_a_models_own_optimized_spacing_falls_back_where_it_has_no_list(linear):
    """A model whose DEFAULT spacing is "optimized" (the shipped `cd`) samples its lists where it has them and
    its fallback spacing elsewhere; an explicit "optimized" still refuses step counts without a list."""
    from ddim.diffusers_io import model_spacing

    lists = {"2": [999, 100]}
    config = {"sampling": {"spacing": "optimized", "fallback_spacing": "linspace", "optimized_timesteps": lists}}
    assert model_spacing(config, 2) == "optimized" and model_spacing(config, 3) == "linspace"
    assert sampling_kwargs(config, linear, 2)["timesteps"] == [999, 100]
    kw = sampling_kwargs(config, linear, 3)
    assert kw["spacing"] == "linspace" and kw["timesteps"] is None
    with pytest.raises(ValueError, match="steps 2, not 3"):
        sampling_kwargs(config, linear, 3, "optimized")
    no_fallback = {"sampling": {"spacing": "optimized", "optimized_timesteps": lists}}
    assert sampling_kwargs(no_fallback, linear, 3)["spacing"] == "trailing"  # the default fallback
    assert model_spacing({"sampling": {}}, 3) == "leading"


def test_cli_klub_objective_prints_a_list(capsys):
    from ddim.cli import run

    assert (
        run(["optimize-timesteps", "--objective", "klub", "--steps", "3", "--n", "4", "--grid", "5", "--no-progress"])
        == 0
    )
    ts = [int(t) for t in capsys.readouterr().out.strip().splitlines()[-1].split(",")]
    assert len(ts) == 3 and ts[0] == 999 and ts == sorted(set(ts), reverse=True)
    assert run(["optimize-timesteps", "--objective", "klub", "--steps", "6", "--grid", "5"]) == 2
