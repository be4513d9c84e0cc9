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


# ----------------------------------------------------------------- streaming outputs, generate/interpolate options
@pytest.mark.parametrize("out", ["s.npz", "s.png", "imgs"])
def test_batches_stream_to_the_same_files(tmp_path, capsys, tiny, monkeypatch, out):
    """--batch smaller than -n writes the same bytes; the CLI keeps uint8 (.npz/.png) or nothing (folder)."""
    import ddim.generate as G

    results = []
    real = G.generate

    def spy(*args, **kwargs):
        results.append((kwargs["keep"], real(*args, **kwargs)))
        return results[-1][1]

    monkeypatch.setattr(G, "generate", spy)
    common = ["sample", "--model", tiny, "-n", "5", "--steps", "4", "--eta", "0.5", "--class", "all", "--no-progress"]
    ok([*common, "--batch", "2", "--out", str(tmp_path / "a" / out)], capsys)
    ok([*common, "--batch", "8", "--out", str(tmp_path / "b" / out)], capsys)

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b and len(a) == (1 if out.endswith((".npz", ".png")) else 6)  # 5 PNGs + settings file
    for keep, r in results:
        assert r.images.numel() == 0 and keep == ("none" if out == "imgs" else "uint8")
        assert (r.uint8 is None) == (keep == "none")
        if keep == "uint8":
            assert r.uint8.shape == (5, 8, 8, 1) and r.uint8.dtype == np.uint8


def test_generate_keep_uint8_equals_converting_the_float_images(tmp_path, tiny):
    from ddim.checkpoint import load
    from ddim.generate import generate, write_images
    from ddim.images import to_uint8

    model, schedule, _ = load(tiny)
    common = dict(n=5, steps=3, eta=1.0, seed=3, labels=torch.tensor([0, 1, -1, 2, 3]), guidance=2.0, batch=2)
    full = generate(model, schedule, **common)
    small = generate(model, schedule, keep="uint8", **common)
    assert small.images.shape == (0, 1, 8, 8) and np.array_equal(small.uint8, to_uint8(full.images))
    for name in ("a.npz", "a.png"):
        write_images(full, tmp_path / "full" / name)
        write_images(small, tmp_path / "small" / name)
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "small" / name).read_bytes()
    chunks = []
    none = generate(model, schedule, keep="none", on_batch=lambda i, x: chunks.append((i, x)), **common)
    # seeds 3..7 in seed-aligned chunks of 2: {3}, {4, 5}, {6, 7}
    assert [i for i, _ in chunks] == [0, 1, 3] and torch.equal(torch.cat([x for _, x in chunks]), full.images)
    with pytest.raises(ValueError, match="holds no images"):
        write_images(none, tmp_path / "none.npz")
    with pytest.raises(ValueError, match="keep"):
        generate(model, schedule, keep="fp16", **common)


def test_generate_variance_is_passed_to_sample(tiny):
    import ddim
    from ddim.checkpoint import load
    from ddim.generate import generate

    model, schedule, _ = load(tiny)
    common = dict(n=3, steps=5, eta=1.0, seed=4, batch=2)
    large = generate(model, schedule, variance="large", **common)
    x_T = ddim.randn((3, 1, 8, 8), [4, 5, 6])
    y = torch.full((3,), 4)  # the null class
    ref = ddim.sample(model, x_T, schedule, steps=5, eta=1.0, variance="large", seeds=[4, 5, 6], model_kwargs={"y": y})
    torch.testing.assert_close(large.images, ref, rtol=0, atol=1e-6)
    assert large.info["variance"] == "large"
    assert not torch.allclose(generate(model, schedule, **common).images, large.images)
    # the older way, through sample_kwargs, still works; two different answers are refused
    old = generate(model, schedule, sample_kwargs={"variance": "large"}, **common)
    assert torch.equal(old.images, large.images)
    with pytest.raises(ValueError, match="disagree"):
        generate(model, schedule, variance="large", sample_kwargs={"variance": "eta"}, **common)
    with pytest.raises(ValueError, match="variance"):
        generate(model, schedule, variance="small", **common)


def test_interpolate_seeds_device(tiny, monkeypatch):
    import ddim.generate as G
    from ddim.checkpoint import load

    model, schedule, _ = load(tiny)
    a = G.interpolate_seeds(model, schedule, 1, 2, frames=3, steps=3, label=1, guidance=2.0)
    b = G.interpolate_seeds(model, schedule, 1, 2, frames=3, steps=3, label=1, guidance=2.0, device=torch.device("cpu"))
    assert torch.equal(a, b) and a.shape == (3, 1, 8, 8) and a.dtype == torch.float32 and a.device.type == "cpu"
    seen = {}

    def fake_sample(m, x_T, sched, **kw):  # where the strip would be sampled
        seen.update(x=x_T.device, y=kw["model_kwargs"]["y"].device, u=kw["uncond_kwargs"]["y"].device)
        return torch.zeros(x_T.shape)

    monkeypatch.setattr(G, "sample", fake_sample)
    out = G.interpolate_seeds(model, schedule, 1, 2, frames=3, steps=3, label=1, guidance=2.0, device="meta")
    assert set(seen.values()) == {torch.device("meta")} and out.device.type == "cpu"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--init", "/no/such/model"], "/no/such/model"),
        (["--steps", "4", "--lr-decay-start", "4"], "--lr-decay-start"),
        (["--data", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_train_bad_flags_one_line_exit_2(tmp_path, capsys, args, needle):
    rc = run(["train", "--data", "digits", "--out", str(tmp_path / "run"), "--steps", "1", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_finish_called_only_after_success(tmp_path, capsys, tiny, monkeypatch):
    """run() leaves the process group (ddim.distributed.finish) after a command succeeded, never after an error."""
    from ddim import distributed as ddist

    calls = []
    monkeypatch.setattr(ddist, "finish", lambda: calls.append(1))
    args = ["sample", "--model", tiny, "--n", "2", "--steps", "2", "--no-progress"]
    assert run([*args, "--out", str(tmp_path / "a.npz")]) == 0 and calls == [1]
    assert run([*args, "--out", str(tmp_path / "a.txt")]) == 2 and calls == [1]  # a usage error
    capsys.readouterr()


def test_embedded_model_keeps_its_clipping_setting_and_the_flag_overrides_it(tmp_path, capsys):
    # The embedded model was measured with ε̂ recomputed from the clipped x̂₀; its config says so, so its
    # images are unchanged by the diffusers-like library default. --model-eps asks for the other setting.
    import ddim

    _, _, config = ddim.load()
    assert config["sampling"]["clip_sample"] is True and config["sampling"]["use_clipped_model_output"] is True

    def images(*extra: str) -> np.ndarray:
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
        args = ["sample", "-n", "2", "--steps", "4", "--class", "all", "--out", str(out), "--no-progress", *extra]
        assert run(args) == 0
        return np.load(out)["images"]

    default = images()
    assert np.array_equal(default, images("--use-clipped-model-output"))
    assert not np.array_equal(default, images("--model-eps"))


def test_interpolate_and_compare_use_the_models_sampling_settings(tmp_path):
    """The strip's ends and compare's DDIM rows are what `ddim sample` makes with the model's settings (here
    x̂₀ clipping and trailing timesteps), not the package defaults."""
    from conftest import save_tiny_digit_model
    from PIL import Image

    import ddim
    from ddim.compare import compare_samplers
    from ddim.generate import generate

    settings = {"sampling": {"guidance": 2.0, "clip_sample": True, "spacing": "trailing"}}
    folder = save_tiny_digit_model(tmp_path / "m", settings)
    for seed in (3, 5):
        assert run(["sample", "--model", folder, "-n", "1", "--seed", str(seed), "--class", "2", "--steps", "4",
                    "--no-progress", "--out", str(tmp_path / f"s{seed}.png")]) == 0  # fmt: skip
    strip = tmp_path / "strip.png"
    assert run(["interpolate", "--model", folder, "--seed-a", "3", "--seed-b", "5", "--frames", "3", "--class", "2",
                "--steps", "4", "--out", str(strip)]) == 0  # fmt: skip
    s = np.asarray(Image.open(strip))
    one = np.asarray(Image.open(tmp_path / "s3.png"))
    h, w = one.shape[:2]
    framed = [s[:h, i * (w - 2) : i * (w - 2) + w] for i in (0, 2)]  # a grid: 2-pixel border on each side
    assert np.array_equal(framed[0], one) and np.array_equal(framed[1], np.asarray(Image.open(tmp_path / "s5.png")))
    model, schedule, config = ddim.load(folder)
    rows = compare_samplers(model, schedule, config, [3], [4], class_spec="2", guidance=2.0)
    made = generate(model, schedule, seeds=[3], labels=torch.tensor([2]), guidance=2.0, steps=4, spacing="trailing",
                    clip_sample=True)  # fmt: skip
    assert torch.equal(rows[1]["images"], made.images)
