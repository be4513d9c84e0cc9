"""`ddim eval cost|memorization|diversity|guidance` on a tiny random model: files, numbers checked by hand,
caching, and one-line errors for bad grids and sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_eval import fails, ok, read_csv  # the CLI helpers of the eval tests

from ddim import NoiseSchedule
from ddim.checkpoint import save_model
from ddim.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random class-conditional 8×8 model (4 classes, T = 100, guidance 2), saved as a model folder."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_heads=2, num_classes=4))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("tiny")
    save_model(folder, model, NoiseSchedule.linear(100), "epsilon", {"sampling": {"guidance": 2.0}})
    return str(folder)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Real 8×8 digits as .npz files: a training set (60) and a held-out set (10)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    u8 = np.round(d.images * (255 / 16)).astype(np.uint8)
    folder = tmp_path_factory.mktemp("digits")
    np.savez(folder / "train.npz", images=u8[:60], labels=d.target[:60] % 4)
    np.savez(folder / "held.npz", images=u8[100:110], labels=d.target[100:110] % 4)
    return str(folder / "train.npz"), str(folder / "held.npz")


# ------------------------------------------------------------------ cost
def test_cost_files_numbers_and_cached_rerun(tmp_path, capsys, tiny):
    out = tmp_path / "cost"
    args = ["eval", "cost", "--model", tiny, "--steps", "2,6", "--batches", "1,3", "--sampler", "ddim,ddpm"]
    text = ok(args + ["--out", str(out), "--no-progress"], capsys)
    assert "Does memory depend on the number of steps?" in text and "**ddpm**" in text
    rows = read_csv(out / "cost.csv")
    assert [(r["sampler"], r["batch"], r["steps"]) for r in rows] == [
        (s, b, st) for s in ("ddim", "ddpm") for b in ("1", "3") for st in ("2", "6")
    ]
    for r in rows:
        assert r["calls"] == r["nfe"] == r["steps"]  # one forward call per step, whatever the batch
        assert float(r["rows_per_image"]) == 2  # guided: conditional and unconditional rows in one call
        assert float(r["seconds"]) > 0 and float(r["peak_mb"]) >= 0 and r["memory"] == "RSS"
    for name in ("cost.md", "cost.png", "cost.json"):
        assert (out / name).stat().st_size > 0
    verdicts = json.loads((out / "cost.json").read_text())["verdicts"]
    assert {(v["sampler"], v["batch"]) for v in verdicts} == {("ddim", 1), ("ddim", 3), ("ddpm", 1), ("ddpm", 3)}
    cells = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert len(cells) == 8
    ok(args + ["--out", str(out), "--no-progress"], capsys)  # measured once: read back, not measured again
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == cells


def test_peak_memory_sees_an_allocation():
    from pathlib import Path

    from ddim.evaluation.cost import _PeakMemory

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    with _PeakMemory(torch.device("cpu")) as small:
        torch.ones(1000).sum()
    with _PeakMemory(torch.device("cpu")) as big:
        x = torch.ones(40 * 2**20 // 4)  # 40 MiB, touched
        del x
    assert big.mb is not None and big.mb > 35 and small.mb < 10


def test_memory_verdicts_by_hand():
    from ddim.evaluation.cost import memory_verdicts, verdict_sentences

    def row(sampler, steps, mb, batch=4, seconds=1.0):
        return {"sampler": sampler, "batch": batch, "steps": steps, "peak_mb": mb, "calls": steps, "nfe": steps,
                "seconds": seconds}  # fmt: skip

    rows = [
        row("ddim", 10, 50.0),
        row("ddim", 100, 51.0, seconds=9.0),  # +1 MiB: flat
        row("ddpm", 10, 50.0),
        row("ddpm", 100, 80.0),  # +30 MiB: grows
        row("ddim", 100, 5.0, batch=1),
    ]
    v = {x["sampler"]: x["depends"] for x in memory_verdicts(rows)}
    assert v == {"ddim": False, "ddpm": True}
    text = " ".join(verdict_sentences(rows, 0.0, sample_numel=784))
    assert "**ddim**: peak memory does not measurably depend" in text and "**ddpm**: peak memory grows" in text
    assert "0.1 → 1.2 MiB here" in text  # 10 and 100 steps × 4 × 784 × 4 bytes
    assert "ddim, batch 4: 9.0× the time for 10.0× the steps" in text
    assert "From batch 1 to 4 at S = 100: ddim 5.0 → 51.0 MiB." in text
    assert "calls equal the sampler's NFE in every cell" in text


def test_cost_refuses_bad_grids(tmp_path, capsys, tiny):
    base = ["eval", "cost", "--model", tiny, "--out", str(tmp_path / "c"), "--no-progress"]
    fails(base + ["--steps", "2,2"], capsys, "--steps repeats 2")
    fails(base + ["--steps", "0,2"], capsys, "--steps values must be >= 1")
    fails(base + ["--batches", "1,x"], capsys, "--batches")
    fails(base + ["--sampler", "ddim,ddim"], capsys, "--sampler repeats")
    fails(base + ["--sampler", "nope"], capsys, "--sampler", "valid")
    fails(base + ["--steps", "500"], capsys, "at most the model's T = 100")
    assert not (tmp_path / "c" / "cells").exists() or not list((tmp_path / "c" / "cells").iterdir())


# ------------------------------------------------------------------ memorization
def test_memorization_helpers_by_hand():
    from ddim.evaluation.memorization import closer_fraction, nearest, pixel_distance, split_heldout

    d, i = nearest(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[3.0, 0.0], [3.0, 4.1]]))
    assert i.tolist() == [0, 1] and d[0].item() == pytest.approx(3.0) and d[1].item() == pytest.approx(0.1)
    imgs = torch.rand(3, 1, 4, 4) * 2 - 1
    d, i = pixel_distance(imgs, torch.cat([imgs.flip(0), -imgs]))
    assert i.tolist() == [2, 1, 0] and d.max().item() == 0.0  # each image finds its own copy
    assert closer_fraction(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 1.0, 3.0, 5.0])) == 0.625
    a, b = split_heldout(7)
    assert a.tolist() == [1, 3, 5] and b.tolist() == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="at least 4"):
        split_heldout(3)


def test_memorization_files_and_a_model_that_copies(tmp_path, capsys, tiny, digits):
    out = tmp_path / "m"
    args = ["eval", "memorization", "--model", tiny, "--n", "8", "--steps", "3", "--pairs", "3", "--no-progress"]
    text = ok(args + ["--train-data", digits[0], "--heldout-data", digits[1], "--out", str(out)], capsys)
    assert "closer to a training image" in text and "control" in text
    summary = json.loads((out / "memorization.json").read_text())
    assert summary["heldout"] == {"name": digits[1], "n": 10, "control": 5, "comparison": 5}
    assert summary["exact_copies"] == 0 and len(summary["closest"]) == 3
    rows = read_csv(out / "memorization.csv")
    assert len(rows) == 8 and all(0 < float(r["train_px"]) <= 1 for r in rows)
    px = sorted(float(r["train_px"]) for r in rows)
    assert [c["train_px"] for c in summary["closest"]] == pytest.approx(px[:3])
    for name in ("memorization.png", "memorization_hist.png", "memorization.md"):
        assert (out / name).stat().st_size > 0
    # Training "data" that holds the samples themselves: every sample is a copy, and the test says so.
    with np.load(out / summary["samples"]) as z:
        copied = np.concatenate([z["images"], z["images"]])
    np.savez(tmp_path / "copies.npz", images=copied)
    out2 = tmp_path / "m2"
    text = ok(args + ["--train-data", str(tmp_path / "copies.npz"), "--heldout-data", digits[1], "--out", str(out2)],
              capsys)  # fmt: skip
    copy = json.loads((out2 / "memorization.json").read_text())
    assert copy["exact_copies"] == 8 and copy["min_train_px"] == 0.0 and copy["near_copies"] == 8
    assert copy["fraction"]["samples_px"] == 1.0 and copy["fraction"]["samples_feat"] == 1.0
    assert "8 sample(s) equal a training image exactly" in text


def test_memorization_errors(tmp_path, capsys, tiny, digits):
    base = ["eval", "memorization", "--model", tiny, "--steps", "2", "--pairs", "2", "--out", str(tmp_path / "m")]
    base += ["--no-progress"]
    fails(base + ["--n", "4", "--pairs", "5"], capsys, "--pairs (5) must be at most --n (4)")
    fails(base + ["--n", "4", "--heldout-data", digits[1]], capsys, "--train-data")  # no known training data
    fails(base + ["--n", "4", "--train-data", digits[0]], capsys, "--heldout-data")
    fails(base + ["--n", "4", "--sampler", "nope", "--train-data", digits[0]], capsys, "--sampler")
    np.savez(tmp_path / "few.npz", images=np.zeros((3, 8, 8), np.uint8))
    fails(base + ["--n", "4", "--train-data", digits[0], "--heldout-data", str(tmp_path / "few.npz")], capsys,
          "at least 4")  # fmt: skip
    np.savez(tmp_path / "big.npz", images=np.zeros((4, 16, 16), np.uint8))
    fails(base + ["--n", "4", "--train-data", str(tmp_path / "big.npz"), "--heldout-data", digits[1]], capsys,
          "--train-data")  # fmt: skip


# ------------------------------------------------------------------ diversity
def test_within_class_distance_by_hand():
    from ddim.evaluation.diversity import within_class_distance

    f = torch.tensor([[0.0], [3.0], [0.0], [4.0], [9.0]])
    assert within_class_distance(f, [0, 0, 1, 1, 2]) == pytest.approx(3.5)  # class 2 has one sample: skipped
    assert within_class_distance(f[:3], None) == pytest.approx((3 + 0 + 3) / 3)
    with pytest.raises(ValueError, match="at least two"):
        within_class_distance(f[:2], [0, 1])


def test_diversity_files_and_numbers(tmp_path, capsys, tiny, digits):
    out = tmp_path / "d"
    args = ["eval", "diversity", "--model", tiny, "--eta", "0,1", "--sampler", "ddim,ddpm,dpmpp_2m", "--steps", "3"]
    args += ["--n", "8", "--seeds-shown", "3", "--data", digits[0], "--cache", str(tmp_path), "--no-progress"]
    text = ok(args + ["--out", str(out)], capsys)
    assert "within-class diversity" in text
    rows = read_csv(out / "diversity.csv")
    assert [(r["sampler"], r["eta"]) for r in rows] == [
        ("ddim", "0"), ("ddim", "1"), ("ddpm", ""), ("dpmpp_2m", ""), ("data", "")
    ]  # fmt: skip
    by = {(r["sampler"], r["eta"]): r for r in rows}
    anchor = by[("ddim", "0")]
    assert float(anchor["spread_px"]) == 0 and float(anchor["spread_feat"]) == 0  # the anchor cell itself
    assert float(by[("ddim", "1")]["spread_px"]) > 0 and float(by[("ddpm", "")]["spread_ratio"]) > 0
    for r in rows:
        assert float(r["diversity"]) > 0 and 0 <= float(r["recall"]) <= 1
    assert by[("data", "")]["spread_px"] == ""
    for name in ("diversity.md", "diversity.png", "diversity_seeds.png", "diversity.json"):
        assert (out / name).stat().st_size > 0
    # the η = 1 cell is table1's η = 1 cell: the same file name scheme, cached
    assert len(list((out / "cells").glob("*.npz"))) == 4


def test_diversity_errors(tmp_path, capsys, tiny, digits):
    base = ["eval", "diversity", "--model", tiny, "--steps", "2", "--data", digits[0], "--cache", str(tmp_path)]
    base += ["--out", str(tmp_path / "d"), "--no-progress"]
    fails(base + ["--eta", "0,0.5,0"], capsys, "--eta repeats 0")
    fails(base + ["--eta", "0,-1"], capsys, "--eta")
    fails(base + ["--eta", "0,nan"], capsys, "--eta")
    fails(base + ["--n", "100"], capsys, "--n (100) is larger than the reference set (60 images)")
    fails(base + ["--n", "5", "--seeds-shown", "6"], capsys, "--seeds-shown (6) must be at most --n (5)")


# ------------------------------------------------------------------ guidance
def _g(space, steps, w, fd, acc=1.0):
    return {"sampler": "ddim", "steps": steps, "guidance": w, "features": space, "fd": fd, "accuracy": acc}


def test_choose_guidance_by_hand():
    from ddim.evaluation.guidance import best_guidance, choose_guidance

    rows = [_g("A", 10, 1.0, 10.0), _g("A", 10, 2.0, 5.0), _g("A", 20, 1.0, 8.0), _g("A", 20, 2.0, 4.0)]
    rows += [_g("B", 10, 1.0, 3.0), _g("B", 10, 2.0, 2.0), _g("B", 20, 1.0, 1.0), _g("B", 20, 2.0, 2.0)]
    assert best_guidance(rows) == {("ddim", 10, "A"): 2.0, ("ddim", 20, "A"): 2.0, ("ddim", 10, "B"): 2.0,
                                   ("ddim", 20, "B"): 1.0}  # fmt: skip
    c = choose_guidance(rows)
    assert c["per_space"]["A"]["guidance"] == 2.0 and c["per_space"]["A"]["scores"] == {1.0: 2.0, 2.0: 1.0}
    assert c["per_space"]["B"]["scores"] == {1.0: 1.25, 2.0: 1.5} and c["per_space"]["B"]["guidance"] == 1.0
    assert c["overall_scores"] == {1.0: 1.625, 2.0: 1.25} and c["guidance"] == 2.0 and not c["agree"]
    rows[5]["accuracy"] = 0.5  # the second space's classifier is not the judge of accuracy
    assert choose_guidance(rows, min_accuracy=0.95)["excluded"] == []
    rows[1]["accuracy"] = 0.5  # w = 2 misclassifies in one cell of the first space: it may not be the default
    c = choose_guidance(rows, min_accuracy=0.95)
    assert c["excluded"] == [2.0] and c["guidance"] == 1.0 and c["per_space"]["A"]["guidance"] == 1.0


def test_guidance_files_two_feature_spaces(tmp_path, capsys, tiny, digits):
    out = tmp_path / "g"
    args = ["eval", "guidance", "--model", tiny, "--guidances", "1,3", "--steps", "2,4", "--n", "8"]
    args += ["--features", "classifier,classifier-check", "--data", digits[0], "--cache", str(tmp_path)]
    text = ok(args + ["--out", str(out), "--no-progress"], capsys)
    assert "Over all feature spaces" in text and "The model's default w = 2" in text  # 2 is not on this grid
    rows = read_csv(out / "guidance.csv")
    assert len(rows) == 2 * 2 * 2 and {r["features"] for r in rows} == {"digit classifier", "checking classifier"}
    for key in {(r["steps"], r["features"]) for r in rows}:
        group = [r for r in rows if (r["steps"], r["features"]) == key]
        best = [r for r in group if r["best"] == "True"]
        assert len(best) == 1 and float(best[0]["fd"]) == min(float(r["fd"]) for r in group)
    for r in rows:
        assert float(r["fd"]) > 0 and 0 <= float(r["accuracy"]) <= 1 and r["nfe"] == r["steps"]
    meta = json.loads((out / "guidance.json").read_text())["meta"]
    assert meta["choice"]["guidance"] in (1.0, 3.0) and meta["default"] == 2.0
    assert len(list((out / "cells").glob("*.npz"))) == 4  # one cell per (S, w), scored in both spaces
    assert "**" in (out / "guidance.md").read_text() and (out / "guidance.png").stat().st_size > 0


def test_guidance_errors(tmp_path, capsys, tiny, digits):
    base = ["eval", "guidance", "--model", tiny, "--steps", "2", "--data", digits[0], "--cache", str(tmp_path)]
    base += ["--features", "classifier", "--out", str(tmp_path / "g"), "--no-progress", "--n", "8"]
    fails(base + ["--guidances", "1,2,1"], capsys, "--guidances repeats 1")
    fails(base + ["--guidances", "1,-2"], capsys, "--guidances")
    fails(base + ["--steps", "3,3"], capsys, "--steps repeats 3")
    fails(base + ["--class", "none"], capsys, "class-conditional")
    fails(base + ["--n", "100"], capsys, "--n (100) is larger than the reference set (60 images)")
    fails(base + ["--features", "classifier,classifier"], capsys, "distinct")


def test_the_checking_classifier_is_another_network_that_reads_digits():
    from ddim.classifier import CheckClassifier, DigitClassifier, check_classifier_path, load_classifier
    from ddim.data import mnist5k_split
    from ddim.evaluation.extractors import load_extractor

    check, main = load_classifier(check_classifier_path()), load_classifier()
    assert isinstance(check, CheckClassifier) and isinstance(main, DigitClassifier)
    assert all(p.dtype == torch.float32 for p in check.parameters())  # stored fp16, loaded float32
    held = mnist5k_split("holdout")
    _, pred = check.predict_features(held.images)
    assert (pred == held.labels).double().mean() > 0.95  # 95.6% when shipped
    ex = load_extractor("classifier-check")
    assert ex.name == "checking classifier" and ex(held.images[:3]).shape == (3, CheckClassifier.FEATURE_DIM)
