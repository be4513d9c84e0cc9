"""Bad input never costs work, data or a traceback: outputs checked before any sampling, silently-wrong
inputs (16-bit images, aliasing seeds, non-finite guidance, damaged resumed files) refused or read
right, one-line errors, bounded interpolation batches, one `ddim train` per run folder, and the API
cases (x_T dtype, nfe, randn dtype, slerp, class labels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ddim
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


def usage_error(args, capsys, needle):
    """The command fails with exit status 2 and ONE line on stderr containing ``needle``."""
    rc = run(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ddim: error:") and needle in err, err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as loading a model (the first costly step)."""
    import ddim.cli.common as common

    def boom(*a, **k):
        raise AssertionError("the command loaded a model before refusing its arguments")

    monkeypatch.setattr(common, "_load_model", boom)
    for mod in ("sample", "eval"):
        monkeypatch.setattr(f"ddim.cli.{mod}._load_model", boom)


# ------------------------------------------------------------------ outputs checked before any work
def test_output_paths_refused_before_loading_the_model(tmp_path, capsys, no_work):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "d.png").mkdir()
    (tmp_path / "adir").mkdir()
    sample = ["sample", "--n", "2", "--steps", "2", "--no-progress", "--out"]
    usage_error([*sample, str(tmp_path / "d.png")], capsys, "is a folder")
    usage_error([*sample, str(tmp_path / "afile" / "x.png")], capsys, "is a file, not a folder")
    usage_error([*sample, str(tmp_path / "afile")], capsys, "a folder is needed")
    usage_error([*sample, str(tmp_path / "x.jpg")], capsys, ".png or .npz")
    usage_error([*sample, ""], capsys, "--out is empty")
    usage_error(["interpolate", "--out", str(tmp_path / "adir")], capsys, ".png")
    usage_error(["interpolate", "--out", str(tmp_path / "afile" / "s.png")], capsys, "not a folder")
    usage_error(["compare", "--out", str(tmp_path / "afile" / "c.png")], capsys, "not a folder")
    usage_error(["compare", "--out", str(tmp_path / "c.txt")], capsys, ".png")
    usage_error(["report", "--out", ""], capsys, "--out is empty")
    usage_error(["report", "--out", str(tmp_path / "adir")], capsys, ".html")
    usage_error(["report", "--out", str(tmp_path / "r.html"), "--work", str(tmp_path / "afile")], capsys, "--work")
    img = tmp_path / "i.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    usage_error(["invert", str(img), "--out", str(tmp_path / "afile")], capsys, "a folder is needed")
    (tmp_path / "inv" / "latents.npz").mkdir(parents=True)
    usage_error(["invert", str(img), "--out", str(tmp_path / "inv")], capsys, "latents.npz is a folder")
    usage_error(["eval", "table1", "--out", str(tmp_path / "afile")], capsys, "a folder is needed")
    usage_error(["train", "--data", "digits", "--out", str(tmp_path / "afile")], capsys, "--out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_folder_refused(tmp_path, capsys, no_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        usage_error(["sample", "--out", str(ro / "x.npz")], capsys, "cannot write in")
    finally:
        ro.chmod(0o700)


def test_check_file_and_folder(tmp_path):
    from ddim.outputs import check_file, check_folder

    assert check_file(tmp_path / "new" / "deeper" / "x.png", suffixes=(".png",)) == tmp_path / "new/deeper/x.png"
    assert not (tmp_path / "new").exists()  # nothing is created
    assert check_folder(tmp_path / "out") == tmp_path / "out"
    assert not list(tmp_path.iterdir())  # the probe leaves nothing behind
    with pytest.raises(ValueError, match="cannot write in"):
        check_file("/proc/x.png")
    with pytest.raises(ValueError, match="--x is empty"):
        check_folder("  ", flag="--x")


# ------------------------------------------------------------------ seeds, guidance, device, threads
def test_seeds_that_would_alias_are_refused(tmp_path, capsys, no_work):
    # torch's CPU generator keeps the low 32 bits: these would be seed 0 / 2**32 - 1 again
    assert torch.equal(
        torch.randn(4, generator=torch.Generator().manual_seed(2**32)),
        torch.randn(4, generator=torch.Generator().manual_seed(0)),
    )
    for bad in ([2**32], [-1]):
        with pytest.raises(ValueError, match="seeds must be ints in"):
            ddim.randn((1, 4), bad)
    ddim.randn((1, 4), [2**32 - 1])  # the largest seed is fine
    out = str(tmp_path / "x.npz")
    usage_error(["sample", "--seed", str(2**32), "--out", out], capsys, "--seed 4294967296 is out of range")
    usage_error(["sample", "--seed", "-1", "--out", out], capsys, "--seed -1")
    usage_error(["sample", "--seed", str(2**63 - 2), "--out", out], capsys, "out of range")
    usage_error(["sample", "--seed", str(2**32 - 2), "-n", "3", "--out", out], capsys, "last of 3 seeds")
    usage_error(["interpolate", "--seed-b", str(2**32), "--out", str(tmp_path / "i.png")], capsys, "--seed-b")
    usage_error(["compare", "--seeds", "1,-3", "--out", str(tmp_path / "c.png")], capsys, "-3 is out of range")
    usage_error(["train", "--data", "digits", "--seed", str(2**32), "--out", str(tmp_path / "r")], capsys, "--seed")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_refused(tmp_path, capsys, no_work, value):
    out = str(tmp_path / "x.png")
    usage_error(["sample", "--class", "1", f"--guidance={value}", "--out", out], capsys, "--guidance")
    usage_error(["sample", f"--eta={value}", "--out", out], capsys, "--eta")
    usage_error(["interpolate", f"--guidance={value}", "--out", out], capsys, "--guidance")
    usage_error(["compare", f"--guidance={value}", "--out", out], capsys, "--guidance")
    usage_error(["train", "--data", "digits", f"--lr={value}", "--out", str(tmp_path / "r")], capsys, "--lr")
    usage_error(["train", "--data", "digits", f"--grad-clip={value}", "--out", str(tmp_path / "r")], capsys, "clip")


def test_non_finite_guidance_refused_by_the_library(tiny):
    from ddim.checkpoint import load
    from ddim.generate import generate, interpolate_seeds

    model, schedule, _ = load(tiny)
    for g in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="guidance must be a finite number"):
            generate(model, schedule, n=1, labels=torch.tensor([1]), guidance=g, steps=2)
        with pytest.raises(ValueError, match="guidance must be a finite number"):
            interpolate_seeds(model, schedule, 0, 1, frames=2, label=1, guidance=g, steps=2)


def test_device_and_threads(tmp_path, capsys):
    out = str(tmp_path / "x.png")
    usage_error(["sample", "--device", "banana", "--out", out], capsys, "--device banana: unknown device")
    usage_error(["sample", "--device", "meta", "--out", out], capsys, "--device meta")
    too_many = str((os.cpu_count() or 1) + 1)
    usage_error(["sample", "--threads", "100000", "--out", out], capsys, "--threads")
    usage_error(["sample", "--threads", too_many, "--out", out], capsys, "CPUs")
    usage_error(["train", "--data", "digits", "--threads", "100000", "--out", str(tmp_path / "r")], capsys, "threads")
    from ddim.perf import set_threads

    with pytest.raises(ValueError, match="CPUs"):
        set_threads(100000)


# ------------------------------------------------------------------ training
TRAIN = ["--data", "digits", "--steps", "1", "--batch", "4", "--base-channels", "8", "--channel-mults", "1,2"]
TRAIN += ["--sample-every", "0", "--T", "50", "--warmup", "1"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--channel-mults", "0,1"], "--channel-mults entries must be an int >= 1, got 0"),
        (["--channel-mults", "1,2,2,2,2"], "divisible"),  # 8×8 digits cannot be halved four times
        (["--base-channels", "12"], "--base-channels"),  # GroupNorm(8) cannot split 12 channels
        (["--lr", "inf"], "--lr"),
    ],
)
def test_train_architecture_errors_are_one_line(tmp_path, capsys, args, needle):
    usage_error(["train", *TRAIN, "--out", str(tmp_path / "run"), *args], capsys, needle)


def test_resume_with_another_architecture_or_data(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert run(["train", *TRAIN, "--out", run_dir]) == 0
    capsys.readouterr()
    usage_error(["train", *TRAIN, "--base-channels", "16", "--out", run_dir], capsys, "base_channels")
    npz = tmp_path / "d.npz"
    np.savez(npz, images=np.zeros((4, 8, 8), np.uint8))
    usage_error(["train", *TRAIN, "--data", str(npz), "--out", run_dir], capsys, "data")
    # the same settings, other data behind them (an image folder whose images changed): the state does not fit
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    args = [*TRAIN, "--data", str(folder), "--image-size", "8", "--out", str(tmp_path / "run2")]
    assert run(["train", *args]) == 0
    capsys.readouterr()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    usage_error(["train", *args, "--steps", "2"], capsys, "does not fit")


def test_one_train_per_folder_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    from ddim.train import RunLock

    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock.acquire(out)
    try:
        err = usage_error(["train", *TRAIN, "--out", str(out)], capsys, "in use by another `ddim train`")
        assert f"pid {os.getpid()}" in err
    finally:
        lock.release()
    # a process holding the lock is killed: the OS drops it, the next run goes ahead
    code = f"import time; from ddim.train import RunLock; RunLock.acquire({str(out)!r}); print('held', flush=True)"
    code += "; time.sleep(60)"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="in use"):
            RunLock.acquire(out)
    finally:
        p.kill()
        p.wait(timeout=30)
    RunLock.acquire(out).release()
    assert run(["train", *TRAIN, "--out", str(out)]) == 0


# ------------------------------------------------------------------ model configs
def test_model_config_errors_are_one_line(tiny, tmp_path, capsys):
    import shutil

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(tiny, d)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    def unknown(c):
        c["unet"]["wings"] = 2

    def wrong_type(c):
        c["unet"]["base_channels"] = "eight"

    def bad_schedule(c):
        c["schedule"] = {"name": "linear", "T": "many"}

    def bad_prediction(c):
        c["prediction"] = "noise"

    out = str(tmp_path / "x.png")
    for name, edit, needle in [
        ("unknown", unknown, "unknown unet field(s) ['wings']"),
        ("type", wrong_type, "base_channels must be an int"),
        ("schedule", bad_schedule, "bad schedule"),
        ("prediction", bad_prediction, "prediction must be one of"),
    ]:
        usage_error(["sample", "--model", variant(name, edit), "--out", out], capsys, needle)


def test_diffusers_folder_without_weights(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    folder = tmp_path / "pipe"
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    usage_error(["sample", "--model", str(folder), "--out", str(tmp_path / "x.png")], capsys, "--model")


# ------------------------------------------------------------------ 16-bit and other image modes
def _gradient16(path):
    a = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    Image.fromarray(a).save(path)
    return np.round(a / 257).astype(np.float32)


def test_16_bit_images_keep_their_range(tmp_path):
    from ddim.data import image_folder
    from ddim.generate import load_images
    from ddim.shard import open_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    want = _gradient16(folder / "g.png")
    assert Image.open(folder / "g.png").mode.startswith("I")  # Pillow's 16-bit grey

    def as_255(x):
        return ((x[0, 0] + 1) * 127.5).round().numpy()

    assert np.array_equal(as_255(load_images([folder / "g.png"], 1, 8)), want)  # invert
    assert np.array_equal(as_255(image_folder(folder, 8).images), want)  # training folders
    assert np.array_equal(as_255(open_images(folder, exact=True).load([0])), want)  # eval samples
    assert open_images(folder).shape == (1, 8, 8)
    # a 32-bit float image is refused, naming the file, rather than guessed at
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match="f.tiff.*float"):
        load_images([tmp_path / "f.tiff"], 1, 8)


def test_invert_reads_a_16_bit_png_right(tiny, tmp_path, capsys):
    img16, img8 = tmp_path / "g16.png", tmp_path / "g8.png"
    want = _gradient16(img16)
    Image.fromarray(want.astype(np.uint8)).save(img8)
    for name, img in (("a", img16), ("b", img8)):
        assert run(["invert", str(img), "--model", tiny, "--steps", "3", "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    za, zb = np.load(tmp_path / "a" / "latents.npz"), np.load(tmp_path / "b" / "latents.npz")
    assert np.array_equal(za["latents"], zb["latents"])  # the 16-bit file is the same image


# ------------------------------------------------------------------ resumed folders
def test_resumed_folder_remakes_damaged_pngs(tiny, tmp_path, capsys):
    out = tmp_path / "imgs"
    args = ["sample", "--model", tiny, "-n", "4", "--steps", "3", "--no-progress", "--out", str(out)]
    assert run(args) == 0
    good = {p.name: p.read_bytes() for p in out.glob("seed_*.png")}
    (out / "seed_000001.png").write_bytes(good["seed_000001.png"][:40])  # truncated
    (out / "seed_000002.png").write_bytes(b"")  # empty
    assert run(args) == 0
    assert "2 of them already there" in capsys.readouterr().out  # the two damaged ones were made again
    assert {p.name: p.read_bytes() for p in out.glob("seed_*.png")} == good


# ------------------------------------------------------------------ interpolation memory
def test_interpolation_is_batched(tiny, tmp_path, capsys, monkeypatch):
    import ddim.generate as G
    from ddim.checkpoint import load

    model, schedule, _ = load(tiny)
    full = G.interpolate_seeds(model, schedule, 3, 4, frames=7, steps=3)
    sizes = []
    real = G.sample

    def spy(m, x_T, *a, **k):
        sizes.append(x_T.shape[0])
        return real(m, x_T, *a, **k)

    monkeypatch.setattr(G, "sample", spy)
    chunks = []
    kept = G.interpolate_seeds(
        model, schedule, 3, 4, frames=7, steps=3, batch=3, on_batch=lambda i, x: chunks.append(i)
    )
    assert sizes == [3, 3, 1] and chunks == [0, 3, 6] and kept.shape == full.shape
    assert (kept - full).abs().max() < 1e-5  # the same frames (batching may change the last bit)
    sizes.clear()
    out = tmp_path / "strip.png"
    args = ["interpolate", "--model", tiny, "--frames", "5", "--steps", "2", "--batch", "2", "--out", str(out)]
    assert run(args) == 0 and sizes == [2, 2, 1]
    assert Image.open(out).size == (2 + 5 * 10, 12)
    capsys.readouterr()


# ------------------------------------------------------------------ the API
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_x_T_of_another_dtype_runs_in_the_models(tiny, dtype):
    from ddim.checkpoint import load

    model, schedule, _ = load(tiny)
    x32 = ddim.randn((2, 1, 8, 8), [0, 1])
    ref = ddim.sample(model, x32, schedule, steps=3)
    x = ddim.sample(model, x32.to(dtype), schedule, steps=3)
    assert x.dtype == dtype and x.shape == ref.shape
    assert (x.float() - ref).abs().max() < (1e-2 if dtype == torch.float16 else 1e-6)
    z = ddim.invert(model, ref.to(dtype), schedule, steps=3)
    assert z.dtype == dtype and torch.isfinite(z).all()


def test_api_argument_errors(tiny):
    from ddim.checkpoint import load
    from ddim.generate import generate
    from ddim.interpolate import slerp

    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        ddim.nfe("heun", 0)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        ddim.randn((1, 4), [0], dtype=torch.int64)
    for bad in (float("nan"), float("inf")):
        z = torch.ones(4)
        z[1] = bad
        with pytest.raises(ValueError, match="finite"):
            slerp(z, torch.ones(4), 0.5)
        with pytest.raises(ValueError, match="finite"):
            slerp(torch.ones(4), z, 0.5)
    model, schedule, _ = load(tiny)  # classes 0..3; 4 is the null class
    for labels in ([4], [-2], [7]):
        with pytest.raises(ValueError, match="labels must be -1"):
            generate(model, schedule, n=1, labels=torch.tensor(labels), steps=2)
    with pytest.raises(TypeError, match="labels must be ints"):
        generate(model, schedule, n=1, labels=torch.tensor([0.5]), steps=2)


def test_seed_chunks():
    from ddim.generate import seed_chunks

    def groups(seeds, b):
        return [seeds[s] for s in seed_chunks(seeds, b)]

    assert groups(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert groups(list(range(3, 8)), 2) == [[3], [4, 5], [6, 7]]
    assert groups([0, 2, 5, 6, 7, 9], 4) == [[0, 2], [5, 6, 7], [9]]
    assert groups([], 4) == []


def test_two_processes_batch_like_one_with_a_batch_that_does_not_divide_n(tmp_path):
    """Chunks are dealt whole: with --batch 32 and n 40 both runs batch seeds {0..31} and {32..39}.

    Dealing seeds one by one (rank r took positions r, r+2, ...) ran seed 34 in a batch of 20 on
    rank 0 instead of a batch of 8, and CPU kernels may round differently per batch size (a pixel off
    by one); now every seed runs with the same neighbours as in one process.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    args = ["sample", "-n", "40", "--steps", "5", "--batch", "32", "--threads", "1", "--no-channels-last"]
    args += ["--no-progress"]
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddim"]
    r = subprocess.run([*head, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run([*args, "--out", str(tmp_path / "one")]) == 0
    names = sorted(p.name for p in (tmp_path / "one").glob("seed_*.png"))
    assert len(names) == 40
    differ = [n for n in names if (tmp_path / "two" / n).read_bytes() != (tmp_path / "one" / n).read_bytes()]
    assert not differ
    # which rank made what: rank 0 the first chunk, rank 1 the short last one
    from ddim.distributed import Context
    from ddim.shard import _deal_chunks

    dealt = [_deal_chunks(list(range(40)), 0, 32, Context(rank=r, world_size=2)) for r in (0, 1)]
    assert dealt == [list(range(32)), list(range(32, 40))]


# ------------------------------------------------------------------ found walking every flag
@pytest.mark.parametrize(
    "args,needle",
    [
        (["sample", "--timesteps", ""], "--timesteps must list at least one"),
        (["sample", "--device", "cuda:x"], "--device"),
        (["train", "--data", "", "--out", "{tmp}/r"], "data is empty"),
        (["train", "--data", "digits", "--out", "", "--steps", "1"], "--out is empty"),
        (["bench", "--guidance", "nan"], "--guidance"),
        (["bench", "--threads", "100000"], "--threads"),
        (["optimize-timesteps", "--seed", "-1"], "--seed -1"),
        (["optimize-timesteps", "--guidance", "inf"], "--guidance"),
        (["eval", "table1", "--seed", "4294967290", "-n", "100", "--out", "{tmp}/t1"], "last of 100 seeds"),
        (["eval", "table1", "--device", "banana", "--out", "{tmp}/t1"], "--device"),
        (["eval", "interpolation", "--seed", str(2**32 - 3), "--pairs", "2", "--out", "{tmp}/i"], "--seed"),
        (["report", "--seed", str(2**32 - 3), "--out", "{tmp}/r.html"], "--seed"),
    ],
)
def test_walk_every_flag(tmp_path, capsys, no_work, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "sample":
        args += ["--out", str(tmp_path / "x.png")]
    usage_error(args, capsys, needle)


def test_empty_model_flag(tmp_path, capsys):
    usage_error(["sample", "--model", "", "--out", str(tmp_path / "x.png")], capsys, "--model is empty")


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 8 GB")

    monkeypatch.setattr("ddim.generate.parse_classes", oom)
    rc = run(["sample", "-n", "2", "--steps", "2", "--no-progress", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "out of memory" in err, err


def test_idle_ranks_are_counted(tmp_path):
    from ddim.distributed import Context
    from ddim.shard import SampleJob

    def job(world, chunks):
        ctx = Context(rank=0, world_size=world)
        return SampleJob(tmp_path, "folder", 4, 0, torch.full((4,), -1), [0, 1], ctx=ctx, chunks=chunks)

    assert job(2, 1).idle_ranks == 1 and job(2, 2).idle_ranks == 0 and job(1, 1).idle_ranks == 0


def test_out_of_range_labels_through_sample(tiny):
    from ddim.checkpoint import load

    model, schedule, _ = load(tiny)  # classes 0..3, 4 = null
    x = ddim.randn((1, 1, 8, 8), [0])
    ddim.sample(model, x, schedule, steps=2, model_kwargs={"y": torch.tensor([4])})
    for y in (5, -1):
        with pytest.raises(ValueError, match=f"y: class label {y} is out of range"):
            ddim.sample(model, x, schedule, steps=2, model_kwargs={"y": torch.tensor([y])})


def test_outputs_that_cannot_fit_in_memory_are_refused_first(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ddim.outputs.physical_memory", lambda: 2**20)  # a machine with 1 MiB
    sample = ["sample", "--model", tiny, "--steps", "2", "--no-progress", "-n", "100000", "--out"]
    usage_error([*sample, str(tmp_path / "x.npz")], capsys, "write a folder")
    usage_error([*sample, str(tmp_path / "dir")], capsys, "ask for fewer")
    usage_error(
        ["interpolate", "--model", tiny, "--frames", "100000", "--out", str(tmp_path / "i.png")], capsys, "--frames"
    )
    assert not (tmp_path / "dir").exists()


def test_npz_images_of_another_range_are_refused(tmp_path):
    from ddim.data import npz_images
    from ddim.shard import ArrayImages

    for name, arr in [
        ("u16", np.full((2, 8, 8), 1000, np.uint16)),
        ("nan", np.full((2, 8, 8), np.nan, np.float32)),
    ]:
        np.savez(tmp_path / f"{name}.npz", images=arr)
        with pytest.raises(ValueError, match="uint8 \\(0..255\\) or floats in \\[0, 1\\]"):
            npz_images(tmp_path / f"{name}.npz")
        with pytest.raises(ValueError, match="must be uint8"):
            ArrayImages(arr)


def test_sample_api_refuses_non_finite_guidance_and_wrong_channels(tiny):
    from ddim.checkpoint import load

    model, schedule, _ = load(tiny)
    x = ddim.randn((1, 1, 8, 8), [0])
    kw = dict(model_kwargs={"y": torch.tensor([1])}, uncond_kwargs={"y": torch.tensor([4])})
    for g in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            ddim.sample(model, x, schedule, steps=2, guidance_scale=g, **kw)
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 8, 8\]"):
        ddim.sample(model, torch.randn(1, 3, 8, 8), schedule, steps=2)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "cost", "--out", "{tmp}/afile"], "a folder is needed"),
        (["eval", "cost", "--seed", "4294967295", "--batches", "1,16", "--out", "{tmp}/c"], "last of 16 seeds"),
        (["eval", "cost", "--eta", "inf", "--out", "{tmp}/c"], "--eta"),
        (["eval", "memorization", "--guidance", "nan", "--out", "{tmp}/m"], "--guidance"),
        (["eval", "diversity", "--out", "{tmp}/afile/x"], "not a folder"),
        (["eval", "guidance", "--guidances", "1,inf", "--out", "{tmp}/g"], "--guidances values must be finite"),
        (["serve", "--threads", "100000"], "--threads"),
        (["serve", "--model", ""], "--model is empty"),
    ],
)
def test_walk_the_newer_commands(tmp_path, capsys, no_work, args, needle):
    (tmp_path / "afile").write_text("x")
    usage_error([a.replace("{tmp}", str(tmp_path)) for a in args], capsys, needle)
