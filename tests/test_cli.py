"""The command line on the embedded default model and on a tiny saved model: outputs, determinism, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddim import NoiseSchedule
from ddim.checkpoint import save_model
from ddim.cli import run
from ddim.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random class-conditional model (8×8, 4 classes) saved as a model folder."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_heads=2, num_classes=4))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("tiny")
    save_model(folder, model, NoiseSchedule.linear(100), "epsilon", {"sampling": {"guidance": 2.0}})
    return str(folder)


def ok(args, capsys):
    rc = run(args)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def test_sample_embedded_png_twice_identical(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    out = ok(["sample", "--n", "4", "--steps", "5", "--class", "all", "--out", str(a), "--no-progress"], capsys)
    assert "5 network evaluations" in out and " s " in out
    ok(["sample", "--n", "4", "--steps", "5", "--class", "all", "--out", str(b), "--no-progress"], capsys)
    assert a.read_bytes() == b.read_bytes()
    assert Image.open(a).size == (2 + 2 * 30, 2 + 2 * 30)


def test_sample_npz_labels_and_uint8(tmp_path, capsys, tiny):
    p = tmp_path / "s.npz"
    ok(
        ["sample", "--model", tiny, "--n", "6", "--steps", "4", "--class", "1,3", "--out", str(p), "--no-progress"],
        capsys,
    )
    z = np.load(p)
    assert z["images"].dtype == np.uint8 and z["images"].shape == (6, 8, 8, 1)
    assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [1, 3, 1, 3, 1, 3]
    assert z["seeds"].tolist() == list(range(6))
    ok(["sample", "--model", tiny, "--n", "2", "--steps", "4", "--out", str(p), "--no-progress"], capsys)
    assert np.load(p)["labels"].tolist() == [-1, -1]


def test_batch_and_seed_invariance(tmp_path, capsys, tiny):
    """Image i depends only on seed K+i: batch size and the range asked for do not change it."""
    common = ["sample", "--model", tiny, "--steps", "6", "--eta", "0.7", "--class", "all", "--no-progress"]
    ok([*common, "--n", "5", "--seed", "10", "--batch", "5", "--out", str(tmp_path / "a.npz")], capsys)
    ok([*common, "--n", "5", "--seed", "10", "--batch", "2", "--out", str(tmp_path / "b.npz")], capsys)
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(a["images"], b["images"])
    ok([*common, "--n", "1", "--seed", "12", "--class", "2", "--out", str(tmp_path / "c.npz")], capsys)
    assert np.array_equal(np.load(tmp_path / "c.npz")["images"][0], a["images"][2])


def test_sample_folder_named_by_seed(tmp_path, capsys, tiny):
    d = tmp_path / "imgs"
    ok(["sample", "--model", tiny, "--n", "3", "--seed", "7", "--steps", "3", "--out", str(d), "--no-progress"], capsys)
    assert sorted(p.name for p in d.glob("*.png")) == ["seed_000007.png", "seed_000008.png", "seed_000009.png"]


def test_uint8_rule(tmp_path, capsys, tiny):
    """uint8 = round(clamp(x/2 + 0.5, 0, 1) · 255) of the sampled x_0."""
    import ddim
    from ddim.checkpoint import load

    p = tmp_path / "s.npz"
    ok(["sample", "--model", tiny, "--n", "2", "--steps", "4", "--out", str(p), "--no-progress"], capsys)
    model, schedule, _ = load(tiny)
    x = ddim.sample(model, ddim.randn((2, 1, 8, 8), [0, 1]), schedule, steps=4, model_kwargs={"y": torch.full((2,), 4)})
    expected = torch.round((x / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.load(p)["images"], expected)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "1001"], "steps"),
        (["--eta", "-1"], "--eta"),
        (["--spacing", "cubic"], "--spacing"),
        (["--sampler", "magic"], "--sampler"),
        (["--class", "12"], "class 12"),
        (["--class", "one"], "class"),
        (["--n", "0"], "--n"),
        (["--out", "x.jpg"], "out"),
        (["--model", "/no/such/model"], "--model"),
        (["--timesteps", "5,5,1"], "timesteps"),
        (["--timesteps", "a,b"], "--timesteps"),
    ],
)
def test_bad_flags_one_line_exit_2(tmp_path, capsys, args, needle):
    rc = run(["sample", "--n", "2", "--steps", "3", "--no-progress", "--out", str(tmp_path / "x.png"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("ddim: error:") and needle in err, err


def test_invert_interpolate_compare(tmp_path, capsys, tiny):
    img = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(img)
    out = ok(["invert", str(img), str(img), "--model", tiny, "--steps", "5", "--out", str(tmp_path / "inv")], capsys)
    assert "reconstruction MSE" in out
    z = np.load(tmp_path / "inv" / "latents.npz")
    assert z["latents"].shape == (2, 1, 8, 8) and z["mse"].shape == (2,)
    assert (tmp_path / "inv" / "reconstruction.png").is_file()
    ok(
        [
            "interpolate",
            "--model",
            tiny,
            "--frames",
            "4",
            "--steps",
            "3",
            "--class",
            "1",
            "--out",
            str(tmp_path / "strip.png"),
        ],
        capsys,
    )
    assert Image.open(tmp_path / "strip.png").size == (2 + 4 * 10, 12)
    out = ok(
        [
            "compare",
            "--model",
            tiny,
            "--seeds",
            "0,1",
            "--steps",
            "2,4",
            "--ddpm-steps",
            "10",
            "--out",
            str(tmp_path / "cmp.png"),
        ],
        capsys,
    )
    assert "DDPM 10" in out and "DDIM 4" in out and (tmp_path / "cmp.png").is_file()


def test_invert_bad_image(tmp_path, capsys, tiny):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"nope")
    assert run(["invert", str(bad), "--model", tiny]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "ddim", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "sample" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "ddim", "sample", "--steps", "-3"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
