"""Reflow: pairs from a teacher's ODE (cached, resumable), a flow student trained on them, straightness."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import ddim
from ddim.evaluation.straightness import ModelRun, ode_path, path_deviation, straightness
from ddim.reflow import PairSettings, load_pairs, make_pairs, reflow


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny class-conditional ε-prediction model on sklearn's 8×8 digits (2 training steps)."""
    from ddim.train import TrainConfig, train

    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = TrainConfig(
        data="digits", out=str(out), steps=2, batch_size=8, T=50, unet={"base_channels": 8, "channel_mults": [1, 2]},
        sample_every=0, checkpoint_every=0, log_every=0, guidance=1.5,
    )  # fmt: skip
    return train(cfg, progress=False)


SMALL = dict(n=12, steps=3, shard_size=5, batch=4)


# ------------------------------------------------------------------ straightness measure
def test_path_deviation_is_zero_for_a_straight_path():
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    taus = torch.linspace(1, 0, 11, dtype=torch.float64)
    path = torch.stack([(1 - t) * x0 + t * eps for t in taus.float()])
    assert path_deviation(path, taus).abs().max().item() < 1e-6


def test_path_deviation_of_a_quarter_circle_is_closed_form():
    theta = torch.linspace(0, math.pi / 2, 2001, dtype=torch.float64)
    path = torch.stack([theta.sin(), theta.cos()], -1)[:, None]  # [K, 1, 2]: from (0, 1) to (1, 0)
    taus = 1 - theta / (math.pi / 2)
    got = path_deviation(path, taus).item()
    assert got == pytest.approx(2 / math.pi - 0.5, rel=1e-5)
    # the measure is geometric up to the time grid: scaling the path changes nothing
    assert path_deviation(3 * path, taus).item() == pytest.approx(got, rel=1e-9)


def test_path_deviation_rejects_bad_shapes():
    with pytest.raises(ValueError, match="K >= 2"):
        path_deviation(torch.zeros(1, 2, 3), torch.zeros(1))
    with pytest.raises(ValueError, match="taus must be"):
        path_deviation(torch.zeros(3, 2, 3), torch.zeros(4))


def test_ode_path_of_an_exact_straight_flow_is_straight():
    """A flow model whose velocity is exactly x_T - x₀ for a fixed x₀ has a straight path and deviation 0,
    while an ε-model of the same data (x̂₀ fixed) is straight in the flow coordinate too (DDIM = Euler there)."""
    sched = ddim.NoiseSchedule.flow(100)
    x0 = torch.full((2, 1, 4, 4), 0.3)
    x0[1] = -0.5

    class Straight(torch.nn.Module):
        config = type("C", (), {"num_classes": 0, "sample_shape": (1, 4, 4)})()

        def forward(self, z, t):
            tau = ((t.double() + 1) / 100).view(-1, 1, 1, 1).float()
            return (z - x0[: z.shape[0]]) / tau  # v = (z - x₀)/τ = ε - x₀ on the path

    run = ModelRun(Straight(), sched, {"prediction": "flow"})
    path, taus = ode_path(run, torch.randn(2, 1, 4, 4), None, steps=10)
    assert taus[0] == 1 and taus[-1] == 0
    torch.testing.assert_close(path[-1].float(), x0, rtol=0, atol=1e-5)
    assert path_deviation(path, taus).max().item() < 1e-6


# ------------------------------------------------------------------ pairs
def test_pairs_are_the_teachers_ode_and_resume(teacher, tmp_path):
    out = make_pairs(str(teacher), tmp_path / "r", PairSettings(**SMALL), progress=False)
    data, noise, manifest = load_pairs(out)
    assert data.images.shape == noise.shape == (12, 1, 8, 8)
    assert manifest["guidance"] == 1.5 and manifest["settings"]["sampler"] == "dpmpp_2m"
    # pair i: x_T from seed i, class i mod 10, x₀ the teacher's dpmpp_2m solution from that x_T
    torch.testing.assert_close(noise, ddim.randn((12, 1, 8, 8), range(12)), rtol=0, atol=0)
    assert data.labels.tolist() == [i % 10 for i in range(12)]
    model, sched, _ = ddim.load(teacher)
    y = torch.arange(12) % 10
    ref = ddim.sample(
        model, noise, sched, steps=3, spacing="trailing", sampler="dpmpp_2m", model_kwargs={"y": y},
        guidance_scale=1.5, uncond_kwargs={"y": torch.full_like(y, 10)},
    )  # fmt: skip
    torch.testing.assert_close(data.images, ref, rtol=0, atol=1e-5)
    # resume: a lost shard is made again, identical; the others are kept as they are
    shard = out / "pairs" / "shard_00001.safetensors"
    before = load_file(shard)
    kept = (out / "pairs" / "shard_00000.safetensors").stat().st_mtime_ns
    shard.unlink()
    make_pairs(str(teacher), out, PairSettings(**SMALL), progress=False)
    after = load_file(shard)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "pairs" / "shard_00000.safetensors").stat().st_mtime_ns == kept
    # other settings into the same folder: refused, naming what differs
    with pytest.raises(ValueError, match="another teacher or settings.*settings"):
        make_pairs(str(teacher), out, PairSettings(**{**SMALL, "steps": 4}), progress=False)


def test_incomplete_pairs_are_refused(teacher, tmp_path):
    out = make_pairs(str(teacher), tmp_path / "r", PairSettings(**SMALL), progress=False)
    (out / "pairs" / "shard_00002.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="shard_00002.*incomplete"):
        load_pairs(out)
    with pytest.raises(ValueError, match="pairs.json is missing"):
        load_pairs(tmp_path)


@pytest.mark.parametrize("bad", ["missing", "file", "notamodel"])
def test_a_teacher_that_is_not_a_model_is_refused(tmp_path, bad):
    target = tmp_path / "t"
    if bad == "file":
        target.write_text("hello")
    elif bad == "notamodel":
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="teacher .* is not a model"):
        make_pairs(str(target), tmp_path / "out", PairSettings(**SMALL), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kw, match",
    [({"sampler": "ddpm"}, "stochastic"), ({"n": 0}, "n must be"), ({"sampler": "nope"}, "unknown sampler")],
)
def test_bad_pair_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        PairSettings(**kw).validate()


# ------------------------------------------------------------------ the student
def test_student_trains_on_the_pairs_noise(teacher, tmp_path, monkeypatch):
    """Each image is noised with its own pair's x_T, never a fresh draw; the student starts from the
    teacher's weights, is a flow model and samples at guidance 1."""
    import ddim.train as train_mod

    pairs = make_pairs(str(teacher), tmp_path / "r", PairSettings(**SMALL), progress=False)
    data, noise, _ = load_pairs(pairs)
    seen = []
    real_loss = train_mod.diffusion_loss

    def spy(model, x0, t, eps, ab, prediction, y=None):
        seen.append((x0.clone(), eps.clone(), prediction))
        return real_loss(model, x0, t, eps, ab, prediction, y)

    monkeypatch.setattr(train_mod, "diffusion_loss", spy)
    out = reflow(pairs, tmp_path / "s", steps=3, batch_size=4, progress=False)
    assert len(seen) == 3
    for x0, eps, prediction in seen:
        assert prediction == "flow"
        for i in range(x0.shape[0]):
            j = [k for k in range(len(data)) if torch.equal(data.images[k], x0[i])]
            assert j and torch.equal(noise[j[0]], eps[i])
    model, sched, config = ddim.load(out)
    assert config["prediction"] == "flow" and sched.is_flow and sched.T == 50
    assert config["sampling"]["guidance"] == 1.0 and config["train"]["label_dropout"] == 0.0
    assert config["sampling"]["spacing"] == "trailing"  # from τ = 1, where the pairs' noise is
    assert config["train"]["pairs"] == str(pairs)


def test_student_starts_from_the_teacher_and_resumes_exactly(teacher, tmp_path):
    pairs = make_pairs(str(teacher), tmp_path / "r", PairSettings(**SMALL), progress=False)
    t_model, _, _ = ddim.load(teacher)
    first = reflow(pairs, tmp_path / "one", steps=1, batch_size=4, lr=1e-12, warmup=0, progress=False)
    s_model, _, _ = ddim.load(first)
    for (name, a), b in zip(t_model.state_dict().items(), s_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    reflow(pairs, tmp_path / "whole", steps=4, batch_size=4, progress=False)
    reflow(pairs, tmp_path / "halves", steps=2, batch_size=4, progress=False)
    reflow(pairs, tmp_path / "halves", steps=4, batch_size=4, progress=False)
    a = load_file(tmp_path / "whole" / "state.safetensors")
    b = load_file(tmp_path / "halves" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_reflow(teacher, tmp_path, capsys):
    from ddim.cli import run

    out = tmp_path / "rf"
    args = ["reflow", "--teacher", str(teacher), "--pairs", "6", "--out", str(out), "--solver-steps", "2"]
    args += ["--shard-size", "4", "--pair-batch", "4", "--batch", "4", "--steps", "2", "--ema", "0.99"]
    assert run(args) == 0, capsys.readouterr().err
    _, sched, config = ddim.load(out)
    assert config["prediction"] == "flow" and (out / "pairs.json").is_file()
    assert config["train"]["ema_decay"] == 0.99 and config["train"]["batch_size"] == 4
    capsys.readouterr()
    assert run(["reflow", "--teacher", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--teacher" in err and "is not a model" in err
    assert run(["reflow", "--out", str(tmp_path / "x"), "--sampler", "ddpm"]) == 2
    assert "stochastic" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_straightness_runs_on_a_model(teacher):
    run = ModelRun(*ddim.load(teacher))
    d = straightness(run, n=3, steps=5, batch=2)
    assert d["n"] == 3 and 0 <= d["mean"] <= d["max"] and math.isfinite(d["std"])


def test_pairs_extend_and_cut_without_redoing_shards(teacher, tmp_path):
    out = make_pairs(str(teacher), tmp_path / "r", PairSettings(**{**SMALL, "n": 10}), progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "pairs").iterdir()}
    make_pairs(str(teacher), out, PairSettings(**SMALL), progress=False)  # 12: a third shard of 2
    assert all((out / "pairs" / k).stat().st_mtime_ns == v for k, v in first.items())
    data, noise, manifest = load_pairs(out)
    assert len(data) == 12 and manifest["settings"]["n"] == 12
    make_pairs(str(teacher), out, PairSettings(**{**SMALL, "n": 5}), progress=False)  # cut: nothing to make
    data5, noise5, _ = load_pairs(out)
    assert torch.equal(data5.images, data.images[:5]) and torch.equal(noise5, noise[:5])


def test_report_straightness_section(teacher, tmp_path):
    """`ddim report --straightness M`: the section's tables hold the measured numbers for both models."""
    from ddim.data import sklearn_digits
    from ddim.evaluation.common import EvalSetup
    from ddim.evaluation.extractors import classifier_extractor
    from ddim.evaluation.metrics import reference_features
    from ddim.evaluation.report import ReportSettings, render_straightness, run_straightness_section

    pairs = make_pairs(str(teacher), tmp_path / "r", PairSettings(**SMALL), progress=False)
    student = reflow(pairs, tmp_path / "s", steps=2, batch_size=4, progress=False)
    model, sched, config = ddim.load(teacher)
    setup = EvalSetup.from_loaded(model, sched, config, class_spec="all", guidance=1.5, batch=4, model_name="teacher")
    extractor = classifier_extractor()
    ref = reference_features(sklearn_digits().images[:40], extractor, name="digits", cache_dir=tmp_path / "c")
    s = ReportSettings(n=6, straightness=[str(student)], straightness_calls=[1, 2], straightness_paths=2)
    result = run_straightness_section(setup, config, s, tmp_path / "work", extractor, ref)
    assert set(result["deviations"]) == {"teacher", str(student)}
    assert [(r["model"], r["steps"]) for r in result["rows"]] == [
        ("teacher", 1), ("teacher", 2), (str(student), 1), (str(student), 2), ("teacher", 50)
    ]  # fmt: skip
    assert result["rows"][0]["calls"] == 2 and result["rows"][2]["calls"] == 1  # guided calls count two
    page = "".join(render_straightness(result))
    assert "Straightness" in page and f"{result['rows'][2]['rms']:.3g}" in page


# ------------------------------------------------------------------ the shipped student
def test_shipped_reflow_loads_by_name_and_is_straighter_than_its_teacher():
    from ddim.checkpoint import shipped_models

    model, sched, config = ddim.load("reflow")
    assert shipped_models()["reflow"].is_dir()
    assert config["prediction"] == "flow" and sched.is_flow and config["storage_dtype"] == "float16"
    assert config["sampling"]["guidance"] == 1.0 and not config["sampling"]["clip_sample"]
    teacher = ModelRun(*ddim.load())
    student = ModelRun(model, sched, config)
    d_teacher = straightness(teacher, n=4, steps=20, seed=1_000_000)
    d_student = straightness(student, n=4, steps=20, seed=1_000_000)
    assert d_student["mean"] < 0.5 * d_teacher["mean"], (d_student, d_teacher)


def test_cli_samples_the_reflow_model_by_name(tmp_path, capsys):
    from ddim.cli import run

    out = tmp_path / "r.png"
    args = ["sample", "--model", "reflow", "-n", "4", "--class", "all", "--steps", "2"]  # trailing: the config's
    assert run([*args, "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert out.is_file()
