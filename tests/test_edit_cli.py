"""`ddim edit` on a tiny random class-conditional model (8×8, 4 classes): every edit writes PNGs at the
inputs' sizes, the mask's outside is the input bit for bit, and every bad input exits 2 before work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save_tiny_digit_model
from PIL import Image

import ddim
from ddim.cli import run
from ddim.edit import class_mean_latents, class_swap, latent_arithmetic


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random class-conditional 8×8 model (4 classes, T = 100), saved as a model folder."""
    return save_tiny_digit_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for name, shape in (("a", (8, 8)), ("b", (8, 8)), ("big", (16, 16)), ("wide", (8, 12))):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(paths[name])
    for name, shape, fill in (("mask", (8, 8), None), ("bigmask", (16, 16), None), ("empty", (8, 8), 0),
                              ("full", (8, 8), 255)):  # fmt: skip
        m = np.zeros(shape, np.uint8) if fill is None else np.full(shape, fill, np.uint8)
        if fill is None:
            m[:, shape[1] // 2 :] = 255
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(m).save(paths[name])
    held = tmp_path / "held.npz"
    np.savez(held, images=(rng.random((8, 8, 8)) * 255).astype(np.uint8), labels=np.arange(8) % 4)
    paths["held"] = held
    return {k: str(v) for k, v in paths.items()}


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_every_edit_writes_pngs_at_the_input_size(tmp_path, files, tiny, capsys):
    base = ["--model", tiny, "--steps", "4"]
    assert run(["edit", files["a"], "--to-class", "2", "--out", str(tmp_path / "c.png"), *base]) == 0
    assert _png(tmp_path / "c.png").shape == (8, 8)
    assert run(["edit", files["a"], files["big"], "--strength", "0.5", "--out", str(tmp_path / "s"), *base]) == 0
    assert _png(tmp_path / "s" / "a.png").shape == (8, 8) and _png(tmp_path / "s" / "big.png").shape == (16, 16)
    assert "resized" in capsys.readouterr().err
    args = ["edit", files["big"], "--mask", files["bigmask"], "--resample", "2", "--out", str(tmp_path / "m.png")]
    assert run([*args, "--to-class", "1", *base]) == 0
    out, inp, mask = _png(tmp_path / "m.png"), _png(files["big"]), _png(files["bigmask"]) > 127
    assert out.shape == inp.shape and np.array_equal(out[~mask], inp[~mask])  # bit-identical outside
    assert not np.array_equal(out[mask], inp[mask])
    args = ["edit", files["a"], "--add-class", "1", "--subtract-class", "2", "--data", files["held"]]
    assert run([*args, "--per-class", "2", "--out", str(tmp_path / "l.png"), *base]) == 0
    assert _png(tmp_path / "l.png").shape == (8, 8)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--mask", "{bigmask}"], "mask"),  # another size: refused, not resized
        (["--mask", "{empty}"], "empty"),
        (["--mask", "{full}"], "whole image"),
        (["--strength", "0"], "--strength"),
        (["--strength", "1.5"], "--strength"),
        (["--strength", "0.01", "--steps", "4"], "at most 1 steps"),
        (["--to-class", "4"], "--to-class 4"),
        (["--to-class", "-1"], "--to-class"),
        (["--strength", "0.5", "--mask", "{mask}"], "different edits"),
        (["--add-class", "1"], "go together"),
        (["--add-class", "1", "--subtract-class", "7"], "--subtract-class 7"),
        (["--resample", "2", "--to-class", "1"], "--resample"),
        ([], "nothing to do"),
        (["--to-class", "1", "--prompt", "a cat"], "--prompt"),
        (["--to-class", "1", "--out", "{a}/x"], "--out"),
    ],
)
def test_bad_input_is_a_usage_error_before_work(tmp_path, files, tiny, capsys, monkeypatch, args, match):
    import ddim.edit as edit

    def never(*a, **k):
        raise AssertionError("no edit may start on bad input")

    for name in ("class_swap", "sdedit", "inpaint", "latent_arithmetic", "class_mean_latents"):
        monkeypatch.setattr(edit, name, never)
    args = [a.format(**files) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "x.png")]
    assert run(["edit", files["a"], "--model", tiny, "--steps", "4", *out, *args]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


def test_bad_images_are_usage_errors(tmp_path, files, tiny, capsys):
    base = ["--model", tiny, "--steps", "4", "--to-class", "1"]
    assert run(["edit", files["wide"], *base, "--out", str(tmp_path / "w.png")]) == 2  # aspect ratio
    assert "crop or pad" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert run(["edit", str(bad), *base, "--out", str(tmp_path / "b.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert run(["edit", files["a"], files["b"], *base, "--out", str(tmp_path / "two.png")]) == 2  # several: a folder
    assert "folder" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png")) or all(p.name != "w.png" for p in tmp_path.glob("*.png"))


def test_exact_class_swap_and_latent_arithmetic(tiny):
    model, schedule, _ = ddim.load(tiny)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    y = {"y": torch.tensor([0, 1])}
    plain, _ = class_swap(model, schedule, x, source_kwargs=y, target_kwargs=y, steps=5)
    exact, z = class_swap(model, schedule, x, source_kwargs=y, target_kwargs=y, steps=5, method="fixed_point",
                          max_iter=8)  # fmt: skip
    assert (exact - x).abs().max() < (plain - x).abs().max() / 10
    null = {"y": torch.tensor([4])}
    means = class_mean_latents(model, schedule, x, torch.tensor([0, 1]), [0, 1], steps=5, model_kwargs=null,
                               max_iter=8)  # fmt: skip
    assert set(means) == {0, 1} and means[0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="no image of class 3"):
        class_mean_latents(model, schedule, x, torch.tensor([0, 1]), [3], steps=5)
    kw = {"steps": 5, "model_kwargs": {"y": torch.tensor([4, 4])}, "max_iter": 8}
    same, _ = latent_arithmetic(model, schedule, x, means[0], means[0], **kw)  # A - A: the exact round trip
    assert (same - x).abs().max() < 1e-3
    moved, z2 = latent_arithmetic(model, schedule, x, means[0], means[1], **kw)
    z0 = ddim.invert(model, x, schedule, steps=5, model_kwargs=kw["model_kwargs"], method="fixed_point", max_iter=8)
    torch.testing.assert_close(z2, z0 + means[0] - means[1])
    assert not torch.allclose(moved, same)


def test_edit_evaluation_rows_and_files(tmp_path, tiny, capsys):
    """`run_edit_eval` on the tiny model with a stand-in classifier: a row per edit, the files, the seam."""
    from ddim.evaluation.edit import run_edit_eval, seam, targets_for

    labels = torch.tensor([0, 1, 2, 3, 0])
    t = targets_for(labels, 4)
    assert not bool((t == labels).any()) and t.tolist() == [1, 3, 1, 0, 2]
    x = torch.zeros(1, 1, 2, 4)
    x[..., 2:] = 1.0  # a step of 1 (0.5 on [0, 1]) between columns 1 and 2
    assert seam(x, 2) == 0.5 and seam(x, 1) == 0.0
    model, schedule, _ = ddim.load(tiny)
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1

    class Const(torch.nn.Module):  # "classifies" everything as class 1: accuracy = share of targets equal to 1
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.ones(x.shape[0], dtype=torch.long), 4).float()

    rows = run_edit_eval(model, schedule, images, labels, Const(), tmp_path / "ev", steps=3, strengths=[0.5, 1.0])
    assert [r["edit"] for r in rows] == ["inversion", "sdedit", "sdedit", "inpaint", "inpaint r=3"]
    assert all(r["accuracy"] == pytest.approx(0.4) for r in rows)  # 2 of 5 targets are class 1
    assert rows[1]["distance"] < rows[2]["distance"] and rows[3]["seam"] is not None and rows[0]["seam"] is None
    assert rows[3]["nfe"] == 3 and rows[4]["nfe"] == 2 * 3 + 1 and rows[0]["nfe"] == 3 * 4 + 3
    for f in ("edit.csv", "edit.md", "edit.png", "edit_examples.png", "edit.json"):
        assert (tmp_path / "ev" / f).is_file()
    from ddim.evaluation.edit import render_edit_section

    page = "".join(render_edit_section(rows, tmp_path / "ev"))
    assert "Editing real images" in page and page.count("data:image/png;base64") == 2 and "inpaint r=3" in page
    assert run(["eval", "edit", "--model", tiny, "--strengths", "0.5,2", "--out", str(tmp_path / "e2")]) == 2
    assert "--strengths" in capsys.readouterr().err
