"""`ddim eval table1|table2|consistency|interpolation` on a tiny random model: files, numbers,
caching and resume, the embedded-default path, and one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import save_tiny_digit_model

from ddim.checkpoint import load
from ddim.cli import run
from ddim.evaluation.common import EvalSetup, sample_cell, scalar
from ddim.evaluation.consistency import consistency_numbers
from ddim.evaluation.interpolation import smoothness
from ddim.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random class-conditional 8×8 model (4 classes, T = 100), saved as a model folder."""
    return save_tiny_digit_model(tmp_path_factory.mktemp("tiny"), {"sampling": {"guidance": 2.0}})


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Real 8×8 digits as .npz files: a reference set (60) and a held-out set (10)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    u8 = np.round(d.images * (255 / 16)).astype(np.uint8)
    folder = tmp_path_factory.mktemp("digits")
    np.savez(folder / "ref.npz", images=u8[:60], labels=d.target[:60])
    np.savez(folder / "held.npz", images=u8[100:110], labels=d.target[100:110] % 4)
    return str(folder / "ref.npz"), str(folder / "held.npz")


def ok(args, capsys):
    rc = run(args)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def fails(args, capsys, *needles):
    rc = run(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for s in needles:
        assert s in err, err
    return err


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ table 1
def test_table1_files_rows_and_cached_rerun(tmp_path, capsys, tiny, digits):
    out = tmp_path / "t1"
    args = ["eval", "table1", "--model", tiny, "--steps", "2,4", "--eta", "0,1", "--n", "12", "--batch", "5"]
    args += ["--data", digits[0], "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    text = ok(args, capsys)
    assert "Fréchet distance" in text and "S = 4" in text
    rows = read_csv(out / "table1.csv")
    assert list(rows[0]) == [
        "sampler", "steps", "eta", "nfe", "n", "fd", "kid", "kid_std", "precision", "recall", "accuracy",
        "seconds", "images_per_s",
    ]  # fmt: skip
    cells = [r for r in rows if r["sampler"] == "ddim"]
    assert [(r["steps"], r["eta"]) for r in cells] == [("2", "0"), ("4", "0"), ("2", "1"), ("4", "1")]
    assert all(r["nfe"] == r["steps"] and r["n"] == "12" for r in cells)
    for r in cells:
        assert float(r["fd"]) > 0 and 0 <= float(r["precision"]) <= 1 and 0 <= float(r["accuracy"]) <= 1
        assert float(r["images_per_s"]) == pytest.approx(12 / float(r["seconds"]), rel=1e-3)
    assert rows[-1]["sampler"] == "data" and rows[-1]["accuracy"] == ""
    for name in ("table1.md", "table1.png", "table1.json"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "cells").glob("*.npz"))) == 4
    assert len(list((tmp_path / "cache" / "reference").glob("*.npz"))) == 1
    # A rerun samples nothing and gives the same table.
    before = (out / "table1.csv").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.npz")}
    ok(args, capsys)
    assert (out / "table1.csv").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.npz")} == mtimes


def test_table1_other_sampler_gets_one_cell_per_step(tmp_path, capsys, tiny, digits):
    out = tmp_path / "t1"
    args = ["eval", "table1", "--model", tiny, "--steps", "3", "--eta", "0,0.5", "--sampler", "ddim,ddpm"]
    args += ["--n", "6", "--no-floor", "--data", digits[0], "--cache", str(tmp_path), "--out", str(out)]
    ok(args + ["--no-progress", "--class", "none"], capsys)
    rows = read_csv(out / "table1.csv")
    assert [(r["sampler"], r["eta"]) for r in rows] == [("ddim", "0"), ("ddim", "0.5"), ("ddpm", "")]
    assert all(r["accuracy"] == "" for r in rows)  # unconditional samples


def test_cells_do_not_depend_on_batch_and_resume_after_a_kill(tmp_path, tiny):
    model, schedule, config = load(tiny)
    whole = EvalSetup.from_loaded(model, schedule, config, batch=7)
    ref = sample_cell(whole, tmp_path / "a", n=7, steps=3, eta=1.0)
    assert ref["images"].shape == (7, 8, 8, 1) and not ref["cached"]

    class Killed(Exception):
        pass

    class KillAfterFirstBatch:
        def update(self, work):
            raise Killed

    small = EvalSetup.from_loaded(model, schedule, config, batch=3)
    with pytest.raises(Killed):
        sample_cell(small, tmp_path / "b", n=7, steps=3, eta=1.0, progress=KillAfterFirstBatch())
    partial = list((tmp_path / "b").glob("*.partial/*.npz"))
    assert len(partial) == 1  # the first batch survived the kill
    resumed = sample_cell(small, tmp_path / "b", n=7, steps=3, eta=1.0)
    np.testing.assert_array_equal(resumed["images"], ref["images"])
    assert not list((tmp_path / "b").glob("*.partial"))
    again = sample_cell(small, tmp_path / "b", n=7, steps=3, eta=1.0)
    assert again["cached"] and again["seconds"] == resumed["seconds"]


# ------------------------------------------------------------------ table 2
def test_table2_files_and_numbers(tmp_path, capsys, tiny, digits):
    out = tmp_path / "t2"
    args = ["eval", "table2", "--model", tiny, "--steps", "2,8", "--n", "6", "--batch", "4"]
    text = ok(args + ["--data", digits[1], "--out", str(out), "--no-progress"], capsys)
    assert "per-dimension MSE" in text
    rows = read_csv(out / "table2.csv")
    assert [r["steps"] for r in rows] == ["2", "8"] and [r["nfe"] for r in rows] == ["4", "16"]
    assert all(0 < float(r["mse"]) < 1 and r["n"] == "6" for r in rows)
    assert (out / "table2_examples.png").stat().st_size > 0 and (out / "table2.png").stat().st_size > 0
    # --labels conditions on the data's classes (cached separately)
    ok(args + ["--data", digits[1], "--out", str(out), "--no-progress", "--labels"], capsys)
    assert len(list((out / "cells").glob("*.npz"))) == 4


def test_table2_defaults_to_the_mnist_heldout_digits():
    from ddim.evaluation.sources import heldout_data, heldout_subset, reference_data

    model = UNet(UNetConfig(image_size=28, base_channels=8, channel_mults=(1, 2), num_heads=2, num_classes=10))
    config = {"data": {"name": "mnist5k", "subset": "train"}}
    held, name = heldout_data(model, config)
    assert len(held) == 500 and "held-out" in name
    few = heldout_subset(held, 50)  # the file is sorted by class: an even spread covers all of them
    assert len(few) == 50 and sorted(few.labels.unique().tolist()) == list(range(10))
    ref, name = reference_data(model, config)
    assert len(ref) == 5000 and name == "mnist5k"
    with pytest.raises(ValueError, match="did not train on"):
        heldout_data(model, {"data": {"name": "folder"}})


# ------------------------------------------------------------------ consistency and interpolation
def test_consistency_numbers_by_hand():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (4, 2, 2, 1)).astype(np.uint8)
    near = np.clip(ref.astype(int) + 10, 0, 255).astype(np.uint8)
    rows, kind = consistency_numbers({10: near, 100: ref}, np.array([0, 0, 1, 1]))
    assert kind == "same class"
    first = rows[0]
    assert first["steps"] == 10 and first["same_xT"] == pytest.approx(np.abs(near / 255 - ref / 255).mean())
    assert rows[1]["same_xT"] == 0.0 and first["ratio"] < 1
    _, kind = consistency_numbers({10: near, 100: ref}, np.array([0, 1, 2, 3]))
    assert kind == "any"


def test_smoothness_by_hand():
    ramp = np.stack([np.full((2, 2, 1), v, dtype=np.uint8) for v in (0, 50, 100, 150)])
    assert smoothness(ramp)[2] == pytest.approx(1.0)
    jump = np.stack([np.full((2, 2, 1), v, dtype=np.uint8) for v in (0, 0, 0, 150)])
    assert smoothness(jump)[2] == pytest.approx(3.0)


def test_consistency_and_interpolation_commands(tmp_path, capsys, tiny):
    c = tmp_path / "c"
    ok(
        ["eval", "consistency", "--model", tiny, "--steps", "2,5,10", "--n", "8", "--out", str(c), "--no-progress"],
        capsys,
    )
    result = json.loads((c / "consistency.json").read_text())
    assert result["reference_steps"] == 10 and result["baseline"] == "same class"  # classes 0..3, twice each
    assert [r["steps"] for r in result["rows"]] == [2, 5, 10] and result["rows"][-1]["same_xT"] == 0
    assert (c / "consistency.png").stat().st_size > 0
    i = tmp_path / "i"
    args = ["eval", "interpolation", "--model", tiny, "--pairs", "2", "--frames", "5", "--steps", "3"]
    text = ok(args + ["--out", str(i), "--no-progress"], capsys)
    assert "Mean ratio" in text
    rows = read_csv(i / "interpolation.csv")
    assert [r["label"] for r in rows] == ["0", "1"] and all(float(r["ratio"]) >= 1 for r in rows)


def test_eval_defaults_to_the_embedded_model(tmp_path, capsys, tiny, monkeypatch):
    from pathlib import Path

    import ddim.checkpoint

    monkeypatch.setattr(ddim.checkpoint, "default_model_path", lambda: Path(tiny))
    out = tmp_path / "c"
    ok(["eval", "consistency", "--steps", "2,3", "--n", "2", "--out", str(out), "--no-progress"], capsys)
    assert json.loads((out / "consistency.json").read_text())["setup"]["model"] == "embedded default"


# ------------------------------------------------------------------ errors
def test_errors_are_one_line(tmp_path, capsys, tiny, digits):
    t1 = ["eval", "table1", "--model", tiny, "--n", "4", "--out", str(tmp_path / "x"), "--no-progress"]
    fails(t1 + ["--features", "inception", "--inception-weights", str(tmp_path / "w.pth")], capsys,
          "pt_inception-2015-12-05-6726825d.pth", "--inception-weights")  # fmt: skip
    fails(t1 + ["--steps", "a,b"], capsys, "--steps")
    fails(t1 + ["--device", "nope"], capsys, "--device nope")
    fails(t1 + ["--eta", "-1"], capsys, "--eta")
    fails(t1 + ["--sampler", "nope"], capsys, "--sampler")
    fails(t1 + ["--class", "9"], capsys, "--class")
    fails(t1 + ["--features", "nope"], capsys, "--features")
    fails(t1, capsys, "--data")  # an 8×8 model with no known training data
    fails(t1 + ["--data", "mnist-all"], capsys, "model makes (1, 8, 8)")
    fails(["eval", "table2", "--model", tiny, "--out", str(tmp_path / "y")], capsys, "did not train on")
    t2 = ["eval", "table2", "--model", tiny, "--data", digits[0], "--labels", "--out", str(tmp_path / "y")]
    fails(t2, capsys, "--labels: the data has class 9")
    fails(["eval", "consistency", "--model", tiny, "--steps", "5"], capsys, "two step counts")
    fails(["eval", "table1", "--model", str(tmp_path / "missing")], capsys, "--model")


# ------------------------------------------------------------------ beside the paper
def test_trend_checks_against_the_paper():
    from ddim.evaluation.paper import PAPER_TABLE1, PAPER_TABLE2, compare_with_paper, trend_checks

    # The paper's own numbers agree with every trend it shows.
    checks = trend_checks(PAPER_TABLE1, PAPER_TABLE2)
    assert checks and all(c["agree"] for c in checks)
    # Numbers where η = 1 beats η = 0 and the MSE does not fall: those trends differ.
    ours = {0.0: {10: 30.0, 20: 20.0}, 1.0: {10: 25.0, 20: 22.0}}
    checks = {c["trend"]: c["agree"] for c in trend_checks(ours, {10: 0.01, 20: 0.02})}
    assert checks["η = 0: FID falls as S grows (10, 20)"] is True
    assert checks["S = 10: FID rises with η (0, 1)"] is False
    assert checks["inversion MSE falls as S grows (10, 20)"] is False
    assert checks["η = 1 and η = 0 draw closer from S = 10 to S = 20 (their ratio moves towards 1)"] is True
    apart = trend_checks({0.0: {10: 10.0, 20: 10.0}, 1.0: {10: 5.0, 20: 1.0}}, {})
    assert [c["agree"] for c in apart if "closer" in c["trend"]] == [False]  # 0.5 -> 0.1: further from 1
    rows1 = [{"sampler": "ddim", "eta": e, "steps": s, "fd": v} for e, d in ours.items() for s, v in d.items()]
    rows1.append({"sampler": "data", "eta": None, "steps": None, "fd": 1.5})
    text = compare_with_paper(rows1, [{"steps": 10, "mse": 0.01}, {"steps": 20, "mse": 0.02}])
    assert "| ours η = 0 | 30 | 20 |" in text and "floor): 1.5" in text and "differs" in text


def test_table1_sigma_hat_row(tmp_path, capsys, tiny, digits):
    """--eta hat is the paper's σ̂ row: η = 1 with DDPM's larger variance, its own cached cell."""
    out = tmp_path / "t1"
    args = ["eval", "table1", "--model", tiny, "--steps", "3", "--eta", "1,hat", "--n", "6", "--no-floor"]
    text = ok(args + ["--data", digits[0], "--cache", str(tmp_path), "--out", str(out), "--no-progress"], capsys)
    assert "σ̂" in text
    rows = read_csv(out / "table1.csv")
    assert [(r["sampler"], r["eta"]) for r in rows] == [("ddim", "1"), ("ddim", "hat")]
    names = sorted(p.name for p in (out / "cells").glob("*.npz"))
    assert len(names) == 2 and any("-etahat-" in n for n in names)
    with np.load(next((out / "cells").glob("*-etahat-*.npz"))) as z:
        hat = z["images"]
        settings = json.loads(scalar(z["settings"]))
        assert settings["variance"] == "large" and settings["sampler"] == "ddpm"  # the reference's DDPM step
    with np.load(next((out / "cells").glob("*-eta1-*.npz"))) as z:
        one = z["images"]
        assert "variance" not in json.loads(scalar(z["settings"]))  # names of η cells are unchanged
    assert not np.array_equal(hat, one)  # the same seeds, a larger step noise
    fails(args + ["--eta", "0,bogus", "--out", str(tmp_path / "z")], capsys, "--eta", "hat")


def test_parse_etas_and_sigma_hat_beside_the_paper():
    from ddim.evaluation.paper import compare_with_paper, trend_checks
    from ddim.evaluation.table1 import SIGMA_HAT, parse_etas

    assert parse_etas("0, 0.5,hat") == [0.0, 0.5, SIGMA_HAT]
    assert parse_etas("σ̂,1") == [SIGMA_HAT, 1.0]
    for bad in ("", "x", "-0.5", "nan"):
        with pytest.raises(ValueError):
            parse_etas(bad)
    ours = {0.0: {10: 30.0, 20: 20.0}, 1.0: {10: 25.0, 20: 22.0}, SIGMA_HAT: {10: 90.0, 20: 40.0}}
    checks = {c["trend"]: c["agree"] for c in trend_checks(ours, {})}
    assert checks["S = 10: σ̂ (DDPM's larger variance) is far worse than η = 1"] is True
    assert checks["σ̂: FID falls as S grows (10, 20)"] is True
    rows1 = [{"sampler": "ddim", "eta": e, "steps": s, "fd": v} for e, d in ours.items() for s, v in d.items()]
    text = compare_with_paper(rows1, [])
    assert "| paper σ̂ | 367.4 | 133.4 |" in text and "| ours σ̂ | 90 | 40 |" in text


# ------------------------------------------------------------------ spacing "optimized"
def test_eval_samples_a_models_optimized_lists_and_falls_back(tmp_path, capsys):
    """A model whose own spacing is "optimized" (the shipped `cd`): its cells sample its list where it has one
    (the same images as generate() with that list) and its fallback spacing elsewhere; an explicit
    --spacing optimized refuses a step count without a list (exit 2) before sampling anything."""
    from ddim.generate import generate
    from ddim.images import to_uint8

    own = {"spacing": "optimized", "fallback_spacing": "linspace", "optimized_timesteps": {"2": [99, 30]}}
    path = save_tiny_digit_model(tmp_path / "m", {"sampling": own})
    model, schedule, config = load(path)
    setup = EvalSetup.from_loaded(model, schedule, config, spacing="optimized", fallback_spacing="linspace", batch=3)
    assert setup.step_times(2) == ("logsnr", [99, 30]) and setup.step_times(3) == ("linspace", None)
    for steps, kw in ((2, {"timesteps": [99, 30]}), (3, {"spacing": "linspace"})):
        cell = sample_cell(setup, tmp_path / "cells", n=3, steps=steps)
        y = setup.labels(3)
        want = generate(model, schedule, n=3, seed=0, labels=y, guidance=setup.guidance, steps=steps, **kw)
        assert np.array_equal(cell["images"], to_uint8(want.images)), steps
        other = generate(model, schedule, n=3, seed=0, labels=y, guidance=setup.guidance, steps=steps)
        assert not np.array_equal(cell["images"], to_uint8(other.images))  # not the default "leading"
    strict = EvalSetup.from_loaded(model, schedule, config, spacing="optimized")
    with pytest.raises(ValueError, match="steps 2, not 3"):
        strict.step_times(3)
    out = tmp_path / "t1"
    args = ["eval", "table1", "--model", path, "--spacing", "optimized", "--steps", "2,3", "--n", "4"]
    assert run([*args, "--out", str(out), "--no-floor", "--no-progress"]) == 2
    assert "--spacing: spacing 'optimized'" in capsys.readouterr().err and not (out / "cells").exists()
