"""`ddim eval samples` in one process: which files of a sample folder count, the numbers against Table 1's
metric code, folder = .npz, the output files, bad sources (one line, exit status 2), and `-n` everywhere.
(Several processes: tests/test_distributed.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ddim.cli import run
from ddim.images import from_uint8, save_png
from ddim.shard import MANIFEST, image_files

N = 16


@pytest.fixture(scope="module")
def images():
    """N random 8×8 grayscale images (uint8 [N, 8, 8, 1]) and a reference set of 40 more as an .npz."""
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (N, 8, 8, 1), dtype=np.uint8), rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(images, tmp_path_factory):
    """The images as a sample folder (seed_*.png, a settings file, and litter to skip), as an .npz, and the
    reference .npz."""
    fake, real = images
    d = tmp_path_factory.mktemp("samples")
    folder = d / "samples"
    for i in range(N):
        save_png(fake[i], folder / f"seed_{i:06d}.png")
    (folder / MANIFEST).write_text(json.dumps({"format": "ddim-sample-folder", "settings": {}}))
    (folder / ".seed_000099.png.x1y2.tmp").write_bytes(b"half a png")  # a run in progress or killed
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()
    np.savez(d / "samples.npz", images=fake)
    np.savez(d / "ref.npz", images=real)
    return folder, d / "samples.npz", d / "ref.npz"


def test_image_files_skips_settings_temporary_and_other_files(tmp_path):
    for name in ("seed_000010.png", "seed_000002.png", "b.png", "a.JPG"):
        save_png(np.zeros((4, 4, 1), np.uint8), tmp_path / name)
    for name in (MANIFEST, ".seed_000003.png.abc.tmp", "x.png.tmp", ".hidden.png", "log.csv"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    names = [p.name for p in image_files(tmp_path)]
    assert names == ["seed_000002.png", "seed_000010.png", "a.JPG", "b.png"]


def test_numbers_match_table1_metric_code_and_folder_equals_npz(images, files, tmp_path):
    from ddim.evaluation.extractors import load_extractor
    from ddim.evaluation.metrics import quality_metrics, reference_features
    from ddim.evaluation.samples import COLUMNS, evaluate_samples

    fake, real = images
    folder, npz, _ = files
    ex = load_extractor("classifier")
    ref = reference_features(from_uint8(real), ex, name="ref", cache_dir=tmp_path)
    a = evaluate_samples(folder, ex, ref, batch=5)
    b = evaluate_samples(npz, ex, ref)
    expected = quality_metrics(ex(from_uint8(fake)), ref)
    assert list(a) == list(COLUMNS) and a["n"] == b["n"] == N and a["image_shape"] == [1, 8, 8]
    assert (a["reference"], a["reference_n"], a["feature_dim"], a["processes"]) == ("ref", 40, 128, 1)
    for key, value in expected.items():
        assert a[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_cli_prints_and_writes_json_and_csv(files, tmp_path, capsys):
    folder, npz, ref = files
    common = ["--data", str(ref), "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert run(["eval", "samples", str(folder), *common, "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert f"{N} images (1×8×8) in {folder}" in out and "Fréchet distance" in out and "recall" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == N and result["reference_n"] == 40 and result["features"] == "digit classifier"
    assert run(["eval", "samples", str(npz), *common, "--batch", "3", "--out", str(tmp_path / "r.csv")]) == 0
    header, row = (tmp_path / "r.csv").read_text().splitlines()
    values = dict(zip(header.split(","), row.split(","), strict=True))
    assert values["n"] == str(N) and values["image_shape"] == "1x8x8"
    assert float(values["fd"]) == pytest.approx(result["fd"], rel=1e-5)


def _bad_sources(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / MANIFEST).write_text("{}")
    mixed = tmp_path / "mixed"
    save_png(np.zeros((8, 8, 1), np.uint8), mixed / "seed_000000.png")
    save_png(np.zeros((16, 16, 1), np.uint8), mixed / "seed_000001.png")
    np.savez(tmp_path / "noimages.npz", x=np.zeros(3))
    Image.new("L", (8, 8)).save(tmp_path / "one.png")
    return {
        "missing": (tmp_path / "missing", "does not exist"),
        "empty": (empty, "holds no images"),
        "mixed": (mixed, "seed_000001.png is 16×16 but seed_000000.png is 8×8"),
        "npz": (tmp_path / "noimages.npz", "no array named 'images'"),
        "file": (tmp_path / "one.png", "is not a folder of images"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "mixed", "npz", "file"])
def test_bad_source_one_line_exit_2(files, tmp_path, capsys, case):
    source, needle = _bad_sources(tmp_path)[case]
    rc = run(["eval", "samples", str(source), "--data", str(files[2]), "--cache", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("ddim: error:") and needle in err and "\n" not in err, err


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "default reference (MNIST-5k) is 1×28×28: pass --data"),
        (["--data", "digits"], "--data: reference images digits are 1×8×8 but the samples are 1×16×16"),
        (["--out", "r.txt"], "must end in .json or .csv"),
        (["--features", "nonsense"], "--features:"),
    ],
)
def test_bad_options_one_line_exit_2(files, tmp_path, capsys, args, needle):
    big = tmp_path / "big"
    for i in range(4):
        save_png(np.zeros((16, 16, 1), np.uint8), big / f"seed_{i:06d}.png")
    rc = run(["eval", "samples", str(big), *args, "--cache", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("ddim: error:") and needle in err and "\n" not in err, err


@pytest.mark.parametrize(
    "command", [["eval", "table1"], ["eval", "table2"], ["eval", "consistency"], ["report"], ["optimize-timesteps"]]
)
def test_dash_n_is_an_alias_of_n(command, capsys):
    """-n is parsed as --n (a bad value is refused by --n's own range check, before any work)."""
    assert run([*command, "-n", "0"]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--n' / '-n'" in err, err
