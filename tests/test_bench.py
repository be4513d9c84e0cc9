"""`ddim bench` runs and reports; it is a benchmark, so no test here asserts a time."""

import pytest
import torch

from ddim.bench import ALGORITHMS, BenchRow, TrivialModel, bench_rows, format_table, run_bench
from ddim.checkpoint import save_model
from ddim.cli import run
from ddim.sampling import SAMPLERS
from ddim.schedule import NoiseSchedule
from ddim.unet import UNet

pytest.importorskip("diffusers")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_rows_for_both_loops_do_the_same_work():
    rows = bench_rows(TrivialModel(), NoiseSchedule.linear(1000), name="trivial", batches=[1, 3], repeats=1)
    assert [(r.algorithm, r.batch) for r in rows] == [(a, b) for a in ALGORITHMS for b in (1, 3)]
    for r in rows:
        assert r.ours is not None and r.diffusers is not None
        assert r.ours.calls == r.diffusers.calls == ALGORITHMS[r.algorithm][1]
        assert r.ours.total > 0 and r.diffusers.total > 0 and r.floor > 0
        assert 0 <= r.ours.network <= r.ours.total and r.ours.overhead_per_step >= 0
        assert r.max_diff is not None and r.max_diff < 1e-3  # same network, inputs and algorithm
    table = format_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert len({len(_cells(line)) for line in table}) == 1  # a well-formed Markdown table
    assert _cells(table[2])[:4] == ["trivial", "DDIM-50", "1", "50"]
    assert "not registered" not in "".join(table)


def test_an_unregistered_sampler_is_skipped_with_a_note(monkeypatch):
    monkeypatch.delitem(SAMPLERS, "dpmpp_2m", raising=False)
    rows = bench_rows(TrivialModel(), NoiseSchedule.linear(1000), name="t", batches=[1], repeats=1)
    skipped = [r for r in rows if r.algorithm == "DPM-Solver++-10"]
    assert skipped and skipped[0].ours is None and "not registered" in skipped[0].note
    assert "not registered" in format_table(rows)


def test_model_rows_with_guidance(tmp_path):
    torch.manual_seed(0)
    model = UNet(image_size=8, base_channels=8, channel_mults=(1, 2), num_classes=3)
    save_model(tmp_path / "tiny", model, NoiseSchedule.linear(1000), "epsilon")
    rows, notes = run_bench(
        models=("shipped",), model_path=str(tmp_path / "tiny"), batches=[2], algorithms=["DDIM-50"], guidance=2.0
    )
    assert len(rows) == 1 and isinstance(rows[0], BenchRow) and rows[0].model == "tiny"
    assert rows[0].max_diff < 1e-3 and any("parameters" in n for n in notes)
    rows, notes = run_bench(models=("shipped",), model_path=str(tmp_path / "missing"))
    assert rows == [] and "skipped" in notes[0]


def test_cli(capsys):
    assert run(["bench", "--models", "trivial", "--batch", "2", "--repeats", "1", "--algorithms", "DDIM-50"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | sampler |") and "| trivial | DDIM-50 | 2 | 50 |" in out
    assert run(["bench", "--models", "nope"]) == 2
    assert run(["bench", "--algorithms", "PLMS-3"]) == 2
    assert run(["bench", "--batch", "0"]) == 2
