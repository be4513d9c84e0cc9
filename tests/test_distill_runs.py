"""Distillation runs (tiny teacher, digits 8×8): progressive rounds and consistency distillation, exact
resume, the students' call counts, the consistency boundary condition, the sampler, shipped names, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import ddim
import ddim.distill_train as dt
from ddim.checkpoint import load, model_summaries, save_model, shipped_models
from ddim.cli import run
from ddim.consistency import ConsistencyModel, consistency_distill_loss, consistency_grid, pseudo_huber
from ddim.data import sklearn_digits
from ddim.distill_train import ConsistencyConfig, ProgressiveConfig, distill_consistency, distill_progressive
from ddim.noise import StepNoise
from ddim.schedule import NoiseSchedule
from ddim.unet import UNet, UNetConfig

TINY = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mults=[1, 2], num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny class-conditional ε teacher on T = 100 with a default guidance and x̂₀ clipping, as the embedded one."""
    torch.manual_seed(0)
    net = UNet(TINY).eval()
    with torch.no_grad():  # non-zero output (the last layers start at zero)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("teacher")
    sampling = {"guidance": 1.5, "clip_sample": True, "use_clipped_model_output": True}
    save_model(folder, net, NoiseSchedule.linear(100), "epsilon", {"sampling": sampling})
    return folder


@pytest.fixture(scope="module")
def digits():
    return sklearn_digits()


def _pd(teacher_dir, out, **kw) -> ProgressiveConfig:
    base = dict(teacher=str(teacher_dir), out=str(out), from_steps=4, to_steps=2, steps=4, batch_size=4)
    base.update(checkpoint_every=2, log_every=1, data="digits", warmup=1)
    base.update(kw)
    return ProgressiveConfig(**base)


def _cd(teacher_dir, out, **kw) -> ConsistencyConfig:
    base = dict(teacher=str(teacher_dir), out=str(out), intervals=4, steps=4, batch_size=4, checkpoint_every=2)
    base.update(log_every=1, data="digits", warmup=1)
    base.update(kw)
    return ConsistencyConfig(**base)


class _Stop(Exception):
    pass


def _stop_after_checkpoint(monkeypatch, at_step: int) -> None:
    """Make the run stop right after the checkpoint of step ``at_step`` is written (as a kill would)."""
    real = dt.save_model

    def save_then_stop(folder, model, schedule, prediction, extra=None, dtype=torch.float32):
        real(folder, model, schedule, prediction, extra, dtype)
        if extra["distill"]["step"] == at_step:
            raise _Stop

    monkeypatch.setattr(dt, "save_model", save_then_stop)


def _straight_and_resumed(run, make, tmp_path, monkeypatch, *, on_stop=None, resume_with=None):
    """Run ``run(make(tmp_path / "straight"))`` through, and ``run(make(tmp_path / "resumed"))`` stopped after
    its step-2 checkpoint, then resumed (``make(..., **resume_with)``); ``on_stop()`` runs in between."""
    run(make(tmp_path / "straight"))
    _stop_after_checkpoint(monkeypatch, 2)
    with pytest.raises(_Stop):
        run(make(tmp_path / "resumed"))
    monkeypatch.undo()
    if on_stop is not None:
        on_stop()
    run(make(tmp_path / "resumed", **(resume_with or {})))


def _assert_same_state(a_path, b_path):
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    assert any(k.startswith("opt.") for k in a) and "rng.data" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_progressive_round_student_shape_and_calls(teacher_dir, digits, tmp_path):
    out = distill_progressive(_pd(teacher_dir, tmp_path / "pd"), progress=False, data=digits)
    model, schedule, config = load(out)
    assert isinstance(model, UNet) and config["prediction"] == "v_prediction"
    assert config["sampling"] == {
        "guidance": 1.0,
        "clip_sample": True,
        "use_clipped_model_output": True,
        "steps": 2,
        "spacing": "trailing",
    }
    assert config["distill"]["done"] and config["distill"]["teacher_steps"] == 4
    assert (out / "round1_2" / "state.safetensors").is_file()
    assert (out / "round1_2" / "log.csv").read_text().count("\n") == 5  # header + 4 steps
    calls = []

    def counting(x, t, **kw):
        calls.append(x.shape[0])
        return model(x, t, **kw)

    x = ddim.sample(
        counting,
        ddim.randn((3, 1, 8, 8), [0, 1, 2]),
        schedule,
        steps=2,
        spacing="trailing",
        prediction="v_prediction",
        model_kwargs={"y": torch.tensor([0, 1, 2])},
        clip_sample=True,
    )
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    assert calls == [3, 3]  # two calls of batch 3: no guidance (the student learnt the guided map)


def test_progressive_two_rounds_resume_exactly(teacher_dir, digits, tmp_path, monkeypatch):
    def stopped_in_round_one():  # round 1, step 2 of 4
        assert not (tmp_path / "resumed" / "round2_2").exists()

    _straight_and_resumed(
        lambda cfg: distill_progressive(cfg, progress=False, data=digits),
        lambda out, **kw: _pd(teacher_dir, out, from_steps=8, to_steps=2, **kw),
        tmp_path,
        monkeypatch,
        on_stop=stopped_in_round_one,
    )
    for name in ("round1_4", "round2_2"):
        _assert_same_state(
            tmp_path / "straight" / name / "state.safetensors", tmp_path / "resumed" / name / "state.safetensors"
        )
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # round 2's student starts from round 1's: its teacher was the 4-step student
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["distill"]["teacher_steps"] == 4


def test_progressive_resume_with_other_settings_is_refused(teacher_dir, digits, tmp_path):
    distill_progressive(_pd(teacher_dir, tmp_path / "pd"), progress=False, data=digits)
    before = (tmp_path / "pd" / "round1_2" / "state.safetensors").read_bytes()
    with pytest.raises(ValueError, match="other settings.*lr"):
        distill_progressive(_pd(teacher_dir, tmp_path / "pd", lr=1e-3), progress=False, data=digits)
    assert (tmp_path / "pd" / "round1_2" / "state.safetensors").read_bytes() == before


def test_progressive_with_four_teacher_steps_per_student_step(teacher_dir, digits, tmp_path, monkeypatch):
    """K = 4: one round from 4 teacher steps to a 1-step student, each target four teacher DDIM steps."""
    seen = []
    real = dt.progressive_distill_loss

    def spy(*args, **kw):
        seen.append((kw["teacher_steps_per_student_step"], kw["teacher_timesteps"].tolist()))
        return real(*args, **kw)

    monkeypatch.setattr(dt, "progressive_distill_loss", spy)
    out = distill_progressive(
        _pd(teacher_dir, tmp_path / "pd", to_steps=1, teacher_steps_per_step=4), progress=False, data=digits
    )
    assert [p.name for p in sorted(out.glob("round*"))] == ["round1_1"]
    assert len(seen) == 4 and {k for k, _ in seen} == {4} and seen[0][1] == [99, 74, 49, 24]
    config = json.loads((out / "config.json").read_text())
    assert config["sampling"]["steps"] == 1
    assert (config["distill"]["teacher_steps"], config["distill"]["student_steps"]) == (4, 1)
    assert config["distill"]["settings"]["teacher_steps_per_step"] == 4


def test_progressive_resumes_a_run_whose_settings_predate_a_new_setting(teacher_dir, digits, tmp_path):
    distill_progressive(_pd(teacher_dir, tmp_path / "pd"), progress=False, data=digits)
    path = tmp_path / "pd" / "distill.json"
    settings = json.loads(path.read_text())
    del settings["teacher_steps_per_step"]  # written before the setting existed: it held the default, 2
    path.write_text(json.dumps(settings))
    distill_progressive(_pd(teacher_dir, tmp_path / "pd"), progress=False, data=digits)
    path.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="teacher_steps_per_step 2 there, 4 now"):
        cfg = _pd(teacher_dir, tmp_path / "pd", from_steps=8, to_steps=2, teacher_steps_per_step=4)
        distill_progressive(cfg, progress=False, data=digits)


def test_progressive_resumes_on_another_device_exactly(teacher_dir, digits, tmp_path, monkeypatch):
    """The device is a runtime setting: checkpoints hold CPU tensors and the draws are made on the CPU."""
    _straight_and_resumed(
        lambda cfg: distill_progressive(cfg, progress=False, data=digits),
        lambda out, **kw: _pd(teacher_dir, out, **kw),
        tmp_path,
        monkeypatch,
        resume_with={"device": "cpu:0"},
    )
    name = "round1_2/state.safetensors"
    _assert_same_state(tmp_path / "straight" / name, tmp_path / "resumed" / name)
    for bad in ("nonsense", "meta"):
        with pytest.raises(ValueError, match="device"):
            _pd(teacher_dir, tmp_path / "x", device=bad).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_both_methods_train_on_cuda(teacher_dir, digits, tmp_path):
    out = distill_progressive(_pd(teacher_dir, tmp_path / "pd", device="cuda"), progress=False, data=digits)
    model, _, _ = load(out)
    assert next(model.parameters()).device.type == "cpu" and isinstance(model, UNet)
    out = distill_consistency(_cd(teacher_dir, tmp_path / "cd", device="cuda"), progress=False, data=digits)
    assert (out / "model.safetensors").is_file()


def test_progressive_init_starts_round_one_from_another_student(teacher_dir, digits, tmp_path):
    first = distill_progressive(_pd(teacher_dir, tmp_path / "first"), progress=False, data=digits)
    # lr ~ 0: the trained student stays where it started, so it shows where that was
    out = distill_progressive(
        _pd(teacher_dir, tmp_path / "second", init=str(first), lr=1e-12), progress=False, data=digits
    )
    start, new = load_file(first / "model.safetensors"), load_file(out / "model.safetensors")
    teacher = load_file(teacher_dir / "model.safetensors")
    assert all(torch.allclose(new[k], start[k], atol=1e-6) for k in new)
    assert not all(torch.allclose(new[k], teacher[k], atol=1e-4) for k in new)
    assert json.loads((out / "distill.json").read_text())["init"] == str(first)
    with pytest.raises(ValueError, match="predicts v_prediction, the students epsilon"):
        cfg = _pd(teacher_dir, tmp_path / "third", init=str(first), student_prediction="epsilon")
        distill_progressive(cfg, progress=False, data=digits)
    assert not (tmp_path / "third" / "distill.json").exists()


def test_progressive_grids_must_nest():
    schedule = NoiseSchedule.linear(1000)
    dt._check_nesting(schedule, 64, [16, 4, 1], 4)
    dt._check_nesting(schedule, 16, [8, 4, 2, 1], 2)
    with pytest.raises(ValueError, match="not every 3-th step of the teacher's 48-step grid"):
        dt._check_nesting(schedule, 48, [16], 3)


def test_consistency_run_resumes_exactly_and_samples(teacher_dir, digits, tmp_path, monkeypatch):
    _straight_and_resumed(
        lambda cfg: distill_consistency(cfg, progress=False, data=digits),
        lambda out, **kw: _cd(teacher_dir, out, **kw),
        tmp_path,
        monkeypatch,
    )
    _assert_same_state(tmp_path / "straight" / "state.safetensors", tmp_path / "resumed" / "state.safetensors")
    assert any(k.startswith("target.") for k in load_file(tmp_path / "straight" / "state.safetensors"))
    model, schedule, config = load(tmp_path / "straight")
    assert isinstance(model, ConsistencyModel) and config["prediction"] == "sample"
    assert model.sigma_data == config["consistency"]["sigma_data"] == 0.5
    assert config["sampling"]["sampler"] == "consistency" and config["distill"]["done"]
    with pytest.raises(ValueError, match="other settings.*target_decay"):
        distill_consistency(_cd(teacher_dir, tmp_path / "straight", target_decay=0.9), progress=False, data=digits)
    x_T = ddim.randn((2, 1, 8, 8), [3, 4])
    calls = []

    def counting(x, t, **kw):
        calls.append(1)
        return model(x, t, **kw)

    for steps in (1, 2, 4):
        calls.clear()

        x = ddim.sample(
            counting,
            x_T,
            schedule,
            steps=steps,
            spacing="trailing",
            sampler="consistency",
            prediction="sample",
            seeds=[3, 4],
            model_kwargs={"y": torch.tensor([1, 2])},
        )
        assert x.shape == x_T.shape and len(calls) == steps == ddim.nfe("consistency", steps)


def test_cli_samples_a_student_with_its_own_defaults(teacher_dir, digits, tmp_path, capsys):
    cd = distill_consistency(_cd(teacher_dir, tmp_path / "cd", steps=1), progress=False, data=digits)
    pd = distill_progressive(_pd(teacher_dir, tmp_path / "pd", steps=1), progress=False, data=digits)
    for folder, extra, calls in [(cd, [], 1), (cd, ["--steps", "2"], 2), (pd, [], 2)]:
        args = ["sample", "--model", str(folder), "-n", "2", "--class", "3", "--out", str(tmp_path / "s.npz")]
        assert run([*args, "--no-progress", *extra]) == 0
        assert f"{calls} network evaluations per image" in capsys.readouterr().out


def test_boundary_condition_is_exact():
    sched = NoiseSchedule.linear(1000)
    torch.manual_seed(1)
    net = UNet(TINY).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    y = torch.tensor([3, 4, 5])
    for prediction in ("v_prediction", "epsilon", "sample"):
        cm = ConsistencyModel(net, sched, prediction)
        for dtype in (torch.float32, torch.float64):
            cm.to(dtype)
            x = 3 * torch.randn(3, 1, 8, 8, dtype=dtype)
            assert torch.equal(cm.consistency_function(x, 0, y=y), x)  # f(x, σ_min) = x, bit for bit
            assert torch.equal(cm.consistency_function(x, torch.zeros(3, dtype=torch.long), y=y), x)
            assert not torch.allclose(cm.consistency_function(x, 500, y=y), x)  # elsewhere the network acts
        cm.float()
    # c_skip falls from 1 to about 0 and c_out rises from 0 to about 1; s_min = s at t = 0
    c = cm.coefficients(torch.tensor([0, 10, 999]), torch.zeros(3, 1))
    assert c[3].flatten().tolist()[0] == 1.0 and c[4].flatten().tolist()[0] == 0.0
    assert c[3].flatten()[2] < 1e-3 and abs(float(c[4].flatten()[2]) - 1) < 1e-3
    assert cm.sigma_min == pytest.approx((1e-4 / (1 - 1e-4)) ** 0.5)


def test_consistency_loss_at_the_boundary_targets_the_teachers_step():
    """On the last interval the target is the teacher's DDIM step to t = 0, scaled by 1/α_0: no target network."""
    sched = NoiseSchedule.linear(100)
    torch.manual_seed(2)
    net = UNet(TINY).double().eval()
    cm = ConsistencyModel(net, sched, "sample")
    grid = consistency_grid(sched, 4)
    assert grid.tolist() == [99, 74, 49, 24, 0]

    def teacher(x, t, **_):
        return 0.3 * x

    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 2])
    index = torch.tensor([3, 3])
    loss = consistency_distill_loss(cm, cm, teacher, sched, x0, y, grid=grid, noise=noise, index=index, distance="l2")
    ab = sched.alphas_cumprod.double()
    z = ab[24].sqrt() * x0 + (1 - ab[24]).sqrt() * noise
    eps = 0.3 * z
    z0 = ab[0].sqrt() * (z - (1 - ab[24]).sqrt() * eps) / ab[24].sqrt() + (1 - ab[0]).sqrt() * eps
    with torch.no_grad():
        want = ((cm(z, torch.tensor([24, 24]), y=y) - z0 / ab[0].sqrt()) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-12)
    assert float(pseudo_huber(z, z)[0]) == 0.0


def test_multistep_sampler_is_algorithm_1():
    sched = NoiseSchedule.linear(1000)

    def f(z, t, **_):  # any x̂₀ model ("sample")
        return torch.tanh(z) * (t.reshape(-1, 1, 1, 1) / 1000.0)

    seeds = [7, 8]
    x_T = ddim.randn((2, 1, 4, 4), seeds)
    ts = ddim.timesteps(sched, 4, "trailing")
    got = ddim.sample(f, x_T, sched, timesteps=ts, sampler="consistency", prediction="sample", seeds=seeds)
    noise = StepNoise(x_T.shape, seeds)
    ab = sched.alphas_cumprod.double()
    x0 = f(x_T, ts[0].expand(2))
    for t in ts[1:]:
        a = float(ab[t])
        z = x0 * a**0.5 + (1 - a) ** 0.5 * noise()
        x0 = f(z, t.expand(2))
    torch.testing.assert_close(got, x0, rtol=0, atol=1e-6)
    # one seed per sample: a batch of two equals two batches of one
    one = ddim.sample(f, x_T[1:], sched, timesteps=ts, sampler="consistency", prediction="sample", seeds=seeds[1:])
    torch.testing.assert_close(got[1:], one, rtol=0, atol=1e-6)
    assert "consistency" in ddim.SAMPLERS and ddim.nfe("consistency", 4) == 4
    with pytest.raises(ValueError, match="eta"):
        ddim.sample(f, x_T, sched, steps=2, sampler="consistency", prediction="sample", eta=1.0, seeds=seeds)


def test_shipped_names_and_models_command(capsys):
    names = shipped_models()
    assert next(iter(names)) == "default"
    model, _, _ = load("default")
    assert isinstance(model, UNet)
    with pytest.raises(FileNotFoundError, match="shipped models: default"):
        load("no_such_model")
    assert run(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(names) == len(model_summaries())
    assert lines[0].startswith("default ")
    students = {"pd4", "cd"}
    assert students <= set(names)
    for name in students:  # the students: loadable by name, sampled with their own defaults
        m, _, config = load(name)
        assert config["sampling"]["steps"] in (1, 2, 4) and config["distill"]["method"] in (
            "progressive",
            "consistency",
        )


def test_a_folder_that_shadows_a_shipped_name_says_so(tmp_path, monkeypatch, capsys):
    """A path wins over a shipped name; when it is no model, the error names the shipped model it hides."""
    (tmp_path / "pd4").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="shadows the shipped model 'pd4'"):
        load("pd4")
    assert run(["sample", "--model", "pd4", "--out", str(tmp_path / "x.png")]) == 2
    assert "shadows the shipped model 'pd4'" in capsys.readouterr().err


def test_shipped_consistency_model_ships_its_tuned_multistep_lists(tmp_path, capsys):
    """`--model cd --spacing optimized` takes the 2/4-call lists chosen by Fréchet distance (its config), each a
    strictly descending list from T-1; the CLI samples with them."""
    from ddim.ays import optimized_timesteps

    _, sched, config = load("cd")
    for steps in (1, 2, 4):
        ts = optimized_timesteps(config, steps)
        assert len(ts) == steps and ts[0] == sched.T - 1 and all(a > b for a, b in zip(ts, ts[1:], strict=False))
    out = tmp_path / "cd.npz"
    args = ["sample", "--model", "cd", "-n", "2", "--class", "all", "--steps", "2", "--spacing", "optimized"]
    assert run([*args, "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    assert "2 network evaluations per image" in capsys.readouterr().out


def test_bad_input_exits_2_before_training(teacher_dir, tmp_path, capsys):
    cases = [
        (["progressive", "--from-steps", "64", "--to-steps", "3"], "--to-steps=3 is not reachable"),
        (
            ["progressive", "--from-steps", "64", "--to-steps", "8", "--teacher-steps-per-step", "4"],
            "--to-steps=8 is not reachable by dividing by 4 --from-steps=64; valid to_steps: 16, 4, 1",
        ),
        (["progressive", "--teacher-steps-per-step", "1"], "--teacher-steps-per-step"),
        (["consistency", "--device", "nonsense"], "--device nonsense: unknown device"),
        (["progressive", "--teacher", str(tmp_path / "missing")], "does not exist"),
        (["progressive", "--teacher", "no_such_model"], "shipped models"),
        (["consistency", "--init", str(tmp_path / "missing")], "--init"),
        (["progressive", "--init", str(tmp_path / "missing")], "--init"),
        (["consistency", "--sigma-data", "0"], "--sigma-data"),
    ]
    if not torch.cuda.is_available():
        cases.append((["progressive", "--device", "cuda"], "--device cuda: no CUDA device is available"))
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    (notmodel / "config.json").write_text('{"hello": 1}')
    cases.append((["progressive", "--teacher", str(notmodel)], "not a ddim model config"))
    for args, match in cases:
        out = tmp_path / "out"
        assert run(["distill", *args, "--out", str(out), "--data", "digits"]) == 2, args
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not (out / "distill.json").exists()
    # resumed with other settings: refused, exit 2, nothing trained
    base = ["distill", "progressive", "--teacher", str(teacher_dir), "--out", str(tmp_path / "pd"), "--data", "digits"]
    base += ["--from-steps", "4", "--to-steps", "2", "--steps", "1", "--batch", "2"]
    assert run(base) == 0
    assert run([*base[:-2], "--batch", "3"]) == 2
    assert "batch_size 2 there, 3 now" in capsys.readouterr().err
