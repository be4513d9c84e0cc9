"""torchrun, two processes, gloo on CPU: sharded sampling identical to one process, a killed run resumed,
a failing rank failing the command, DDP training that checkpoints and resumes exactly, sharded statistics,
`ddim eval samples` over a sample folder equal to one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file

import ddim
from ddim import NoiseSchedule
from ddim.checkpoint import load, save_model
from ddim.cli import run
from ddim.unet import UNet, UNetConfig

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

NPROC = 2
N = 24
SAMPLE = ["--steps", "30", "--eta", "0.5", "--class", "all", "--no-progress"]
TRAIN = [
    "--steps",
    "4",
    "--batch",
    "4",
    "--base-channels",
    "8",
    "--channel-mults",
    "1,2",
    "--checkpoint-every",
    "2",
    "--sample-every",
    "0",
    "--T",
    "100",
    "--warmup",
    "2",
]


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DDIM_DIST_TIMEOUT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _torchrun_cmd(*args: str, module: bool = True) -> list[str]:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}"]
    return [*head, "-m", "ddim", *args] if module else [*head, *args]


def torchrun(*args: str, timeout: float = 120, module: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        _torchrun_cmd(*args, module=module), capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            kids = [int(c) for c in (task / "children").read_text().split()]
            out += kids
            todo += kids
    return out


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


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """Single-process outputs of the request the sharded runs make: a folder and an .npz."""
    d = tmp_path_factory.mktemp("ref")
    for out in (d / "imgs", d / "s.npz"):
        assert run(["sample", "--model", tiny, "-n", str(N), *SAMPLE, "--batch", "5", "--out", str(out)]) == 0
    return d


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("data") / "d.npz"
    np.savez(p, images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), labels=np.arange(40) % 4)
    return p


def test_npz_merged_on_rank0_identical(tiny, reference, tmp_path):
    out = tmp_path / "s.npz"
    r = torchrun("sample", "--model", tiny, "-n", str(N), *SAMPLE, "--batch", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" images on 2 processes") == 1, r.stdout  # rank 0 alone reports
    assert out.read_bytes() == (reference / "s.npz").read_bytes()


@pytest.mark.skipif(
    not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
    reason="needs /proc/PID/task/TID/children to find torchrun's workers",
)
def test_killed_run_resumes_with_exactly_the_right_images(tiny, reference, tmp_path):
    """SIGKILL torchrun and both workers midway, start again: every image once, byte-identical."""
    out = tmp_path / "imgs"
    args = ["sample", "--model", tiny, "-n", str(N), *SAMPLE, "--batch", "1", "--out", str(out)]
    with open(tmp_path / "log", "w") as log:
        p = subprocess.Popen(_torchrun_cmd(*args), stdout=log, stderr=subprocess.STDOUT, env=_env())
        deadline = time.monotonic() + 90
        while len(list(out.glob("seed_*.png"))) < 4 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        for pid in [*_descendants(p.pid), p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=30)
    before = len(list(out.glob("seed_*.png")))
    assert 4 <= before < N, (before, (tmp_path / "log").read_text()[-2000:])
    (out / ".seed_000001.png.leftover.tmp").write_bytes(b"half a png")  # what a kill inside a write leaves

    r = torchrun(*args)
    assert r.returncode == 0, r.stderr
    assert f"{N - before} images on 2 processes" in r.stdout and f"{before} of them already there" in r.stdout
    names = sorted(p.name for p in out.iterdir())
    expected = sorted(p.name for p in (reference / "imgs").iterdir())
    assert names == expected and len(names) == N + 1  # the images and ddim-sample.json; no temporary files
    for name in expected:
        if name.endswith(".png"):
            assert (out / name).read_bytes() == (reference / "imgs" / name).read_bytes(), name

    # a single process continues the same folder: nothing left to do; other settings are refused
    assert run(["sample", "--model", tiny, "-n", str(N), *SAMPLE, "--out", str(out)]) == 0
    assert run(["sample", "--model", tiny, "-n", str(N), *SAMPLE, "--steps", "7", "--out", str(out)]) == 2


def test_adaptive_steps_sharded_equal_one_process_and_report_every_images_calls(tiny, tmp_path, capsys):
    """--rtol under torchrun: each image takes its own steps, so the shards' images equal one process's; rank 0
    reports the calls of all images."""
    args = ["-n", "8", "--class", "all", "--rtol", "0.1", "--batch", "2", "--no-progress", "--threads", "1"]
    one = tmp_path / "one.npz"
    assert run(["sample", "--model", tiny, *args, "--out", str(one)]) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    two = tmp_path / "two.npz"
    r = torchrun("sample", "--model", tiny, *args, "--out", str(two))
    assert r.returncode == 0, r.stderr
    assert two.read_bytes() == one.read_bytes()
    line = next(ln for ln in r.stdout.splitlines() if "images on 2 processes" in ln)
    # the same per-image calls: the same mean, min and max in both summaries
    assert said.split(", ")[1].split(" (")[0] in line and said.split("(")[1].split(";")[0] in line, (said, line)


def test_failing_rank_fails_the_command(tiny, tmp_path):
    """Rank 1 cannot write seed 3 (a folder is in the way): the command fails with its error, no hang."""
    out = tmp_path / "imgs"
    (out / "seed_000003.png").mkdir(parents=True)
    tic = time.monotonic()
    r = torchrun("sample", "--model", tiny, "-n", "8", *SAMPLE, "--out", str(out), timeout=100)
    assert r.returncode != 0
    assert "ddim: error:" in r.stderr and "seed_000003.png" in r.stderr and "rank      : 1" in r.stderr, r.stderr
    assert time.monotonic() - tic < 90  # the 1800 s collective timeout did not have to fire


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from ddim import distributed as ddist
    from ddim.shard import map_images, sharded_feature_stats
    from ddim.train import TrainConfig, train

    out, folder, data = sys.argv[1:4]
    ctx = ddist.init()
    res = {"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend, "shard": ddist.shard(list(range(7)))}
    try:
        ddist.check(ValueError("disk full") if ctx.rank == 1 else None)
        res["check"] = "passed"
    except ddist.RankError as e:
        res["check"] = f"peer: {e}"
    except ValueError as e:
        res["check"] = f"own: {e}"
    mu, sigma = sharded_feature_stats(folder, lambda x: x.flatten(1)[:, :6] * 3, batch=5)
    res["mu"], res["sigma"] = mu.tolist(), sigma.tolist()
    res["mapped"] = map_images(folder, lambda x: x.flatten(1).sum(1), batch=5).tolist()
    unet = {"base_channels": 8, "channel_mults": [1, 2]}
    for name, steps in (("straight", 4), ("half", 2)):
        train(TrainConfig(data=data, out=os.path.join(out, name), steps=steps, batch_size=4, unet=unet,
                          checkpoint_every=2, sample_every=0, T=100, warmup=2), progress=False)
    with open(os.path.join(out, f"rank{ctx.rank}.json"), "w") as f:
        json.dump(res, f)
    ddist.finish()  # every rank succeeded: leave the group before the interpreter shuts down
    assert not torch.distributed.is_initialized() and ddist.context().world_size == 1
    """
)


@pytest.fixture(scope="module")
def worker(reference, data_npz, tmp_path_factory):
    d = tmp_path_factory.mktemp("worker")
    (d / "worker.py").write_text(WORKER)
    r = torchrun(str(d / "worker.py"), str(d), str(reference / "imgs"), str(data_npz), module=False)
    assert r.returncode == 0, r.stderr
    return d, [json.loads((d / f"rank{k}.json").read_text()) for k in range(NPROC)]


def test_collectives_and_error_flag(worker):
    _, (r0, r1) = worker
    assert (r0["world"], r0["backend"]) == (2, "gloo") and r0["shard"] == [0, 2, 4, 6] and r1["shard"] == [1, 3, 5]
    assert r0["check"] == "peer: rank 1 of 2 failed: ValueError: disk full" and r1["check"] == "own: disk full"


def test_sharded_feature_stats_match_one_process(worker, reference):
    from ddim.generate import load_images
    from ddim.metrics import feature_stats
    from ddim.shard import image_files

    _, (r0, r1) = worker
    files = image_files(reference / "imgs")
    assert [p.name for p in files] == [f"seed_{i:06d}.png" for i in range(N)]
    x = load_images(files, 1, 8)
    mu, sigma = feature_stats(x.flatten(1)[:, :6] * 3)
    for r in (r0, r1):
        np.testing.assert_allclose(r["mu"], mu, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r["sigma"], sigma, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r["mapped"], x.flatten(1).sum(1).numpy(), rtol=1e-6)


def test_ddp_train_checkpoints_loads_and_resumes_exactly(worker, data_npz, tmp_path):
    """The worker trained 4 steps straight and 2 steps elsewhere under DDP; `ddim train` under torchrun
    resumes the 2-step run to 4 and ends bit-identical to the straight run."""
    import shutil

    from ddim.train import TrainConfig, train

    d, _ = worker
    model, schedule, config = load(d / "half")
    assert config["train"]["step"] == 2 and config["train"]["world_size"] == 2
    assert config["train"]["effective_batch_size"] == 8
    x = ddim.sample(
        model, ddim.randn((2, 1, 8, 8), [0, 1]), schedule, steps=3, model_kwargs={"y": torch.tensor([1, 2])}
    )
    assert torch.isfinite(x).all()

    out = tmp_path / "run"
    shutil.copytree(d / "half", out)
    r = torchrun("train", "--data", str(data_npz), *TRAIN, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "DistributedDataParallel on 2 processes (gloo): batch 4 per process, effective batch 8" in r.stdout
    assert r.stdout.count("trained 4 steps") == 1  # rank 0 alone reports
    a = load_file(d / "straight" / "state.safetensors")
    b = load_file(out / "state.safetensors")
    assert a.keys() == b.keys() and {"rng.data", "rng.data.1", "rng.torch", "rng.torch.1"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["rng.data"], a["rng.data.1"])  # the ranks draw different batches
    assert load_file(d / "straight" / "model.safetensors").keys() == load_file(out / "model.safetensors").keys()

    # resuming it in one process would change the random streams: refused
    cfg = TrainConfig(
        data=str(data_npz),
        out=str(out),
        steps=6,
        batch_size=4,
        unet={"base_channels": 8, "channel_mults": [1, 2]},
        checkpoint_every=2,
        sample_every=0,
        T=100,
        warmup=2,
    )
    with pytest.raises(ValueError, match="trained on 2 processes"):
        train(cfg, progress=False)


def _eval_folder(reference, tmp_path):
    """A copy of the single-process sample folder, with litter `ddim eval samples` must skip."""
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(reference / "imgs", folder)
    (folder / ".seed_000030.png.abc123.tmp").write_bytes(b"half a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_eval_samples_two_processes_equal_one(reference, data_npz, tmp_path, capsys):
    """The folder `ddim sample` wrote, evaluated by 1 and by 2 processes: the same numbers."""
    folder = _eval_folder(reference, tmp_path)
    args = ["eval", "samples", str(folder), "--data", str(data_npz), "--batch", "5", "--no-progress"]
    assert run([*args, "--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    r = torchrun(*args, "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "two.json"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Fréchet distance") == 1 and "on 2 processes" in r.stdout, r.stdout  # rank 0 reports
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["n"], one["processes"], two["n"], two["processes"]) == (N, 1, N, 2)
    assert one["reference_n"] == two["reference_n"] == 40 and one["image_shape"] == [1, 8, 8]
    # equal up to float rounding: the classifier sees other batch sizes (float32 features differ in the last
    # bits), the moments are merged in another order, and the Fréchet distance takes square roots of
    # near-zero eigenvalues (24 images, 128-d features): about 1e-8 relative
    for key in ("fd", "kid", "kid_std"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    assert (two["precision"], two["recall"]) == (one["precision"], one["recall"])


def test_eval_samples_bad_image_on_one_rank_fails_every_rank(reference, data_npz, tmp_path):
    """seed_000003.png (rank 1's share) has another size: both ranks stop with the error, no hang."""
    folder = _eval_folder(reference, tmp_path)
    Image.new("L", (16, 16)).save(folder / "seed_000003.png")
    tic = time.monotonic()
    r = torchrun("eval", "samples", str(folder), "--data", str(data_npz), "--cache", str(tmp_path), "--no-progress")
    assert r.returncode != 0
    assert "ddim: error:" in r.stderr and "seed_000003.png is 16×16 but seed_000000.png is 8×8" in r.stderr, r.stderr
    assert "rank 1 of 2 failed" in r.stderr, r.stderr  # rank 0 names the rank that met it
    assert time.monotonic() - tic < 90


def test_finish_leaves_only_a_group_ddim_started(tmp_path):
    """finish() is a no-op in one process, and never tears down a process group someone else started."""
    from ddim import distributed as ddist

    ddist.finish()  # no group: nothing to do
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert ddist.init().world_size == 1
        ddist.finish()
        assert dist.is_initialized()  # the caller's group is the caller's to leave
    finally:
        dist.destroy_process_group()


def test_reflow_pairs_sharded_over_two_processes_equal_one(tiny, tmp_path):
    """`ddim reflow` under torchrun: the shards are dealt to the ranks and come out byte-identical to a
    one-process run's; the student then trains under DDP and loads as a flow model."""
    args = [
        "reflow",
        "--teacher",
        tiny,
        "--pairs",
        "10",
        "--shard-size",
        "3",
        "--solver-steps",
        "3",
        "--batch",
        "4",
        "--threads",
        "1",
    ]  # one thread: the same sums in every process
    assert run([*args, "--steps", "0", "--out", str(tmp_path / "one")]) == 0
    r = torchrun(*args, "--steps", "2", "--out", str(tmp_path / "two"), timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    for k in range(4):
        a = load_file(tmp_path / "one" / "pairs" / f"shard_{k:05d}.safetensors")
        b = load_file(tmp_path / "two" / "pairs" / f"shard_{k:05d}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    _, sched, config = load(tmp_path / "two")
    assert config["prediction"] == "flow" and sched.is_flow and config["train"]["world_size"] == NPROC
