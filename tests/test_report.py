"""`ddim report`: one self-contained HTML page with every part, from a tiny random model."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch

from ddim import NoiseSchedule
from ddim.checkpoint import save_model
from ddim.cli import run
from ddim.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_heads=2, num_classes=4))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    root = tmp_path_factory.mktemp("report")
    save_model(root / "model", model, NoiseSchedule.linear(100), "epsilon", {"sampling": {"guidance": 1.5}})
    d = load_digits()
    u8 = np.round(d.images * (255 / 16)).astype(np.uint8)
    np.savez(root / "ref.npz", images=u8[:60])
    np.savez(root / "held.npz", images=u8[100:108])
    return root


def test_report_is_one_self_contained_page(setup, tmp_path, capsys):
    root = setup
    out = tmp_path / "report.html"
    args = ["report", "--model", str(root / "model"), "--out", str(out), "--steps", "2,4", "--eta", "0,1", "--n", "8"]
    args += ["--table2-n", "4", "--heldout-data", str(root / "held.npz"), "--data", str(root / "ref.npz")]
    args += ["--consistency-steps", "2,6", "--consistency-n", "4", "--pairs", "2", "--frames", "4"]
    args += ["--cache", str(tmp_path / "cache"), "--no-progress", "--train-data", str(root / "ref.npz")]
    assert run(args) == 0, capsys.readouterr().err
    page = out.read_text()
    for title in ("Table 1", "Table 2", "Consistency", "Interpolation", "Reproduce", "What the numbers say"):
        assert title in page
    for title in ("Guidance × steps", "η and diversity", "Memorization", "Cost: time", "ddim eval guidance"):
        assert title in page  # the evidence sections (issue 21)
    assert "Skipped" not in page
    # Self-contained: every image is embedded, nothing is fetched.
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    # The page shows the numbers the work folder holds.
    work = tmp_path / "report_files"
    with open(work / "table1" / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    fd = float(rows[0]["fd"])
    assert f"{fd:.4g}" in page
    assert (work / "table2" / "table2.csv").is_file() and (work / "interpolation" / "interpolation.csv").is_file()
    # A second run reuses every cached part.
    cells = {p: p.stat().st_mtime_ns for p in work.rglob("cells/*.npz")}
    assert run(args) == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob("cells/*.npz")} == cells
