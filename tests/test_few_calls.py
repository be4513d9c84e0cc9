"""The report's few-calls section: any model × sampler × spacing × steps from the same noises, against one map."""

from __future__ import annotations

import math

import pytest
from conftest import save_tiny_digit_model

import ddim
from ddim.evaluation.straightness import FewCallRun, ModelRun, few_call_rows


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = save_tiny_digit_model(tmp_path_factory.mktemp("tiny"), {"sampling": {"guidance": 1.5}})
    return folder, ddim.load(folder)


@pytest.fixture(scope="module")
def measure(tmp_path_factory):
    from ddim.data import sklearn_digits
    from ddim.evaluation.extractors import classifier_extractor
    from ddim.evaluation.metrics import reference_features

    extractor = classifier_extractor()
    cache = tmp_path_factory.mktemp("ref")
    return extractor, reference_features(sklearn_digits().images[:40], extractor, name="digits", cache_dir=cache)


def test_parse_names_model_sampler_steps_and_spacing():
    assert FewCallRun.parse("pd4:ddim:4") == FewCallRun("pd4", "ddim", 4, None)
    assert FewCallRun.parse("self:dpmv3:5:trailing") == FewCallRun("self", "dpmv3", 5, "trailing")
    bad_rows = (
        ("pd4:ddim", "MODEL:SAMPLER"),
        ("x:nope:4", "unknown sampler"),
        ("x:ddim:0", "STEPS"),
        ("x:ddim:four", "STEPS"),
        ("x:ddim:4:sideways", "unknown spacing"),
        (":ddim:4", "MODEL"),
    )
    for bad, word in bad_rows:
        with pytest.raises(ValueError, match=word):
            FewCallRun.parse(bad)


def test_rows_measure_each_sampler_from_the_same_noises(loaded, measure, tmp_path):
    folder, (model, sched, config) = loaded
    extractor, ref = measure
    runs = {"self": ModelRun(model, sched, config), "unguided": ModelRun(model, sched, config, guidance=1.0)}
    texts = ("self:ddim:100:leading", "self:ddim:3", "self:unipc:3:trailing", "self:heun:2:trailing",
             "self:restart:2:trailing", "unguided:ddim:3")  # fmt: skip
    specs = [FewCallRun.parse(t) for t in texts]
    kw = dict(n=6, seed=3, batch=4, cache=tmp_path, extractor=extractor, real=ref.features)
    rows = few_call_rows(runs, specs, "self", **kw)
    assert [(r["model"], r["sampler"], r["steps"]) for r in rows] == [(s.model, s.sampler, s.steps) for s in specs]
    assert rows[0]["rms"] == 0.0  # the map itself
    assert [r["calls"] for r in rows] == [200, 6, 6, 6, 10, 3]  # guided calls count two; heun 2·2-1, restart 2+3
    assert rows[1]["spacing"] == "leading"  # the model's own spacing when none is given
    assert all(math.isfinite(r["fd"]) and 0 < r["rms"] < 1 for r in rows[1:])
    assert rows[1]["rms"] != rows[5]["rms"]  # guidance is part of the run
    again = few_call_rows(runs, specs[4:5], "self", **kw)  # cached images; restart is seeded per image
    assert again[0]["rms"] == rows[4]["rms"]
    with pytest.raises(ValueError, match="not among"):
        few_call_rows(runs, [FewCallRun("other", "ddim", 2)], "self", **kw)


def test_report_section_renders_the_rows(loaded, measure, tmp_path):
    from ddim.evaluation.common import EvalSetup
    from ddim.evaluation.report import ReportSettings, render_few_calls, run_few_calls_section

    folder, (model, sched, config) = loaded
    extractor, ref = measure
    setup = EvalSetup.from_loaded(model, sched, config, class_spec="all", guidance=1.5, batch=4, model_name="tiny")
    s = ReportSettings(n=4, few_calls=["self:ddim:2", f"{folder}:dpmv3:3:trailing"])
    result = run_few_calls_section(setup, config, s, tmp_path / "work", extractor, ref)
    assert [(r["model"], r["sampler"]) for r in result["rows"]] == [("tiny", "ddim"), (folder, "dpmv3")]
    page = "".join(render_few_calls(result))
    assert "A few network calls" in page and f"{result['rows'][1]['rms']:.3g}" in page


def test_cli_refuses_a_bad_row_before_work(loaded, tmp_path, capsys):
    from ddim.cli import run

    folder, _ = loaded
    out = tmp_path / "r.html"
    for bad, word in (("self:ddim", "MODEL:SAMPLER"), ("nowhere/model:ddim:2", "nowhere")):
        assert run(["report", "--model", folder, "--out", str(out), "--few-calls", bad]) == 2
        assert word in capsys.readouterr().err
    assert not out.exists()
