"""`ddim eval table1|table2|consistency|interpolation` and `ddim report`: the paper's tables and
figures measured on a model (the embedded default unless --model is given); `ddim eval samples`: the
quality of images already made (a folder written by `ddim sample`, under torchrun too)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from ddim.cli.common import (
    UsageError,
    _check_device,
    _check_out_file,
    _check_out_folder,
    _check_seeds,
    _load_model,
    _model_default,
    main,
)
from ddim.cli.options import (
    batch_option,
    class_option,
    collect,
    eta_option,
    guidance_option,
    model_option,
    progress_option,
    seed_option,
    spacing_option,
)
from ddim.evaluation.report import ReportSettings


def _setup_group(*batch: Callable) -> Callable:
    """--model, --class, --guidance, --spacing, --seed, then ``batch`` (a --batch option, or none),
    --progress, --device: passed to the command as ONE dict argument ``run`` (see :func:`_setup`)."""
    from ddim.timesteps import SPACINGS

    return collect(
        "run",
        model_option(),
        class_option(
            "default",
            "Classes as in `ddim sample` (int, comma list, 'all'), or 'none' for unconditional. "
            "default: 'all' for class-conditional models.",
        ),
        guidance_option(),
        spacing_option(
            sorted([*SPACINGS, "optimized"]),
            help="Which S timesteps ('optimized': the model's optimised list for S, if it ships one) "
            "[the model's own spacing].",
        ),
        seed_option(full_range=True),
        *batch,
        progress_option(),
        _device_option,
    )


def _common(f):
    """--model, --class, --guidance, --spacing, --seed, --batch, --progress, --device as ``run``."""
    return _setup_group(batch_option(50, "Images per batch (and per resume point)."))(f)


def _setup_options(f):
    """--model, --class, --guidance, --spacing, --seed, --progress, --device as ``run`` (no --batch)."""
    return _setup_group()(f)


_device_option = click.option(
    "--device", default="cpu", show_default=True, help="Where the model and feature extractor run (cpu, cuda, ...)."
)


_features = collect(
    "feats",
    click.option(
        "--features",
        default=None,
        help="Feature extractor: 'classifier' (shipped digit classifier), 'inception' (FID Inception-V3), "
        "a TorchScript file, or 'package.module:factory'. [classifier for 1-channel images, else inception]",
    ),
    click.option(
        "--inception-weights",
        default=None,
        type=click.Path(dir_okay=False),
        help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID weights) [$DDIM_INCEPTION_WEIGHTS "
        "or ~/.cache/ddim/]. Never downloaded.",
    ),
    click.option(
        "--data",
        default=None,
        help="Reference images: 'mnist-all', 'digits', a .npz or an image folder [MNIST-5k for 28×28 digits].",
    ),
    click.option(
        "--cache",
        default=None,
        type=click.Path(file_okay=False),
        help="Folder for cached reference features [$DDIM_CACHE or ~/.cache/ddim].",
    ),
)
"""--features, --inception-weights, --data, --cache, passed as ONE dict argument ``feats``."""


def _feature_args(feats: dict) -> tuple:
    """(features, inception_weights, data, cache) of the :data:`_features` options."""
    return feats["features"], feats["inception_weights"], feats["data"], feats["cache"]


def _numbers(text: str, name: str, kind: type, positive: bool) -> list:
    """Parse a comma list of ``kind``; values must be > 0 (``positive``) or >= 0, else a UsageError."""
    from ddim.evaluation.common import parse_list

    try:
        values = parse_list(text, kind, name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if any(v < 1 if positive else v < 0 for v in values):
        raise UsageError(f"{name} must be {'positive' if positive else 'non-negative'}, got {text!r}")
    return values


def _ints(text: str, name: str) -> list[int]:
    return _numbers(text, name, int, positive=True)


def _floats(text: str, name: str) -> list[float]:
    return _numbers(text, name, float, positive=False)


def _etas(text: str) -> list[float | str]:
    from ddim.evaluation.table1 import parse_etas

    try:
        return parse_etas(text)
    except ValueError as e:
        raise UsageError(f"--eta: {e}") from None


def _setup(run: dict, batch: int | None = None, steps: Sequence[int] = ()):
    """The evaluation setup of a command's ``run`` options (:func:`_setup_group`), with ``batch`` when
    given (else run["batch"]), and the model's config; ``steps``: the step counts the command will run
    (checked against the spacing before any work)."""
    import torch
    from click.core import ParameterSource

    model_path, class_spec, guidance = run["model_path"], run["class_spec"], run["guidance"]
    spacing, seed, device = run["spacing"], run["seed"], run.get("device", "cpu")
    batch = run["batch"] if batch is None else batch

    from ddim.evaluation.common import EvalSetup

    dev = torch.device(_check_device(device))
    model, schedule, config = _load_model(model_path)
    model.to(dev)
    given = click.get_current_context().get_parameter_source("spacing") not in (None, ParameterSource.DEFAULT)
    spacing = _model_default("spacing", spacing, config)  # a student's own grid unless --spacing is given
    fallback = None  # a model whose own spacing is "optimized": its fallback where it has no list
    if spacing == "optimized" and not given:
        fallback = str((config.get("sampling") or {}).get("fallback_spacing", "trailing"))
    try:
        setup = EvalSetup.from_loaded(
            model,
            schedule,
            config,
            class_spec=class_spec,
            guidance=guidance,
            spacing=spacing,
            seed=seed,
            batch=batch,
            model_name=str(model_path) if model_path else "embedded default",
            device=str(dev),
            fallback_spacing=fallback,
        )
        setup.labels(1)  # refuse a bad class spec now
    except (ValueError, TypeError) as e:
        raise UsageError(f"--class: {e}") from None
    for s in steps:  # an explicit --spacing optimized needs a list for every step count asked for
        try:
            setup.step_times(s)
        except ValueError as e:
            raise UsageError(f"--spacing: {e}") from None
    return setup, config


def _extractor_and_reference(setup, config, feats: dict, progress: bool):
    """The feature extractor (on the setup's device) and the reference set's cached features (``feats``:
    the :data:`_features` options)."""
    from ddim.evaluation.metrics import reference_features
    from ddim.evaluation.sources import extractor_for, reference_data

    features, inception_weights, data, cache = _feature_args(feats)
    try:
        extractor = extractor_for(setup.model, features, inception_weights).to(setup.device)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except (ValueError, TypeError) as e:
        raise UsageError(f"--features: {e}") from None
    try:
        ref_data, name = reference_data(setup.model, config, data)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--data: {e}") from None
    reference = reference_features(ref_data.images, extractor, name=name, cache_dir=cache, progress=progress)
    return extractor, reference


def _run_eval(out: str, md: str, files: str, run: Callable, *args, **kwargs) -> None:
    """``run(*args, **kwargs)``, an evaluation writing into the folder ``out``, with a ValueError as a
    usage error; then its Markdown table ``md`` and the files it wrote (``files``, relative to ``out``)."""
    try:
        run(*args, **kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    click.echo((Path(out) / md).read_text())
    click.echo(f"-> {out}/{files}")


@main.group("eval")
def eval_group() -> None:
    """The DDIM paper's tables and figures, measured on a model: table1, table2, consistency, interpolation;
    and samples: the quality of images already made (a `ddim sample` folder or .npz)."""


@eval_group.command("table1")
@_common
@_features
@click.option("--steps", "steps_list", default="10,20,50,100,1000", show_default=True, help="Step counts S.")
@click.option(
    "--eta",
    "eta_list",
    default="0,0.2,0.5,1",
    show_default=True,
    help="η values (DDIM); 'hat' = the paper's σ̂ row (η = 1, DDPM's larger variance).",
)
@click.option("--sampler", "sampler_list", default="ddim", show_default=True, help="Comma list of samplers.")
@click.option("--n", "-n", default=1000, show_default=True, type=click.IntRange(min=4), help="Samples per cell.")
@click.option("--floor/--no-floor", default=True, show_default=True, help="Add a row for n real images.")
@click.option("--out", default="eval/table1", show_default=True, help="Output folder (resumes what it holds).")
def table1_cmd(run, feats, steps_list, eta_list, sampler_list, n, floor, out) -> None:
    """Table 1: sample quality (Fréchet distance, KID, precision, recall) for each S and η.

    Writes OUT/table1.csv, table1.md, table1.png and the cached samples (OUT/cells); a killed run
    resumes where it stopped.
    """
    from ddim.evaluation.table1 import run_table1
    from ddim.sampling import SAMPLERS

    seed, progress = run["seed"], run["progress"]
    steps = _ints(steps_list, "--steps")
    etas = _etas(eta_list)
    samplers = [s.strip() for s in sampler_list.split(",") if s.strip()]
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad or not samplers:
        raise UsageError(f"--sampler: unknown {bad or sampler_list!r}; valid: {', '.join(sorted(SAMPLERS))}")
    _check_out_folder(out)
    _check_seeds(seed, n)
    setup, config = _setup(run, steps=steps)
    extractor, reference = _extractor_and_reference(setup, config, feats, progress)
    _run_eval(
        out,
        "table1.md",
        "table1.csv, table1.md, table1.png",
        run_table1,
        setup,
        out,
        extractor,
        reference,
        steps=steps,
        etas=etas,
        samplers=samplers,
        n=n,
        floor=floor,
        progress=progress,
    )


@eval_group.command("table2")
@model_option()
@click.option("--steps", "steps_list", default="10,20,50,100", show_default=True, help="Step counts S.")
@click.option(
    "--n",
    "-n",
    default=500,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images (spread evenly over the data).",
)
@click.option(
    "--data",
    default=None,
    help="Real images the model did not train on (a load_data spec) [the 500 held-out MNIST-5k digits].",
)
@click.option(
    "--labels/--no-labels",
    default=False,
    show_default=True,
    help="Condition on the data's classes (default: the null class, unconditional as in the paper).",
)
@click.option("--spacing", default="leading", show_default=True)
@click.option("--batch", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--out", default="eval/table2", show_default=True, help="Output folder (resumes what it holds).")
@progress_option()
@click.option(
    "--method",
    "methods",
    multiple=True,
    default=("ddim",),
    show_default=True,
    type=click.Choice(["ddim", "fixed_point", "bdia"]),
    help="Inversion method, repeatable: a row per method (fixed_point, bdia: exact inversion; docs/inversion.md).",
)
@click.option(
    "--max-iter", default=4, show_default=True, type=click.IntRange(min=1), help="fixed_point: calls per step at most."
)
@click.option(
    "--budget",
    default="front",
    show_default=True,
    type=click.Choice(["uniform", "front"]),
    help="fixed_point: --max-iter calls every step, or the same total front-loaded (more on the first steps).",
)
@click.option(
    "--guidance",
    "guidance_list",
    default="1",
    show_default=True,
    help="Guidance weights w of both directions, comma list (w != 1 conditions on the data's classes).",
)
@_device_option
def table2_cmd(
    model_path, steps_list, n, data, labels, spacing, batch, out, progress, methods, max_iter, budget, guidance_list,
    device,
) -> None:  # fmt: skip
    """Table 2: DDIM inversion then decoding; per-dimension MSE on [0, 1] against S, with an example figure."""
    from ddim.evaluation.sources import heldout_data, heldout_subset
    from ddim.evaluation.table2 import run_table2

    steps = _ints(steps_list, "--steps")
    try:
        weights = [float(w) for w in guidance_list.split(",")]
    except ValueError:
        raise UsageError(f"--guidance: expected comma-separated numbers, got {guidance_list!r}") from None
    if len(set(weights)) != len(weights) or not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--guidance: expected distinct finite weights, got {guidance_list!r}")
    labels = labels or any(w != 1.0 for w in weights)  # guidance needs the condition
    _check_out_folder(out)
    fixed = {"model_path": model_path, "class_spec": "none", "guidance": None, "seed": 0}
    setup, config = _setup({**fixed, "spacing": spacing, "batch": batch, "device": device})
    try:
        d, name = heldout_data(setup.model, config, data)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--data: {e}") from None
    d = heldout_subset(d, n)
    n = len(d)
    y = None
    if labels:
        if d.labels is None or not setup.num_classes:
            raise UsageError("--labels (and --guidance other than 1) needs labelled data and a class-conditional model")
        y = d.labels[:n]
        if int(y.max()) >= setup.num_classes:
            raise UsageError(
                f"--labels: the data has class {int(y.max())}; the model has classes 0..{setup.num_classes - 1}"
            )
    _run_eval(
        out,
        "table2.md",
        "table2.csv, table2.md, table2.png, table2_examples.png",
        run_table2,
        setup,
        d.images,
        out,
        steps=steps,
        labels=y,
        data_name=name,
        progress=progress,
        methods=list(dict.fromkeys(methods)),
        max_iter=max_iter,
        budget=budget,
        guidance=weights,
    )


@eval_group.command("edit")
@click.option("--model", "model_path", default=None, help="A class-conditional model [embedded default].")
@click.option("--n", "-n", default=50, show_default=True, type=click.IntRange(min=1), help="Held-out images.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="S of every edit.")
@click.option("--strengths", default="0.3,0.5,0.7,0.9", show_default=True, help="SDEdit strengths in (0, 1].")
@click.option("--guidance", default=1.0, show_default=True, type=float, help="Guidance weight of the regeneration.")
@click.option("--data", default=None, help="Labelled held-out images (a load_data spec) [MNIST-5k held-out digits].")
@click.option("--classifier", default=None, help="Digit classifier weights [the shipped one].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--out", default="eval/edit", show_default=True, help="Output folder.")
@_device_option
def edit_cmd(model_path, n, steps, strengths, guidance, data, classifier, seed, out, device) -> None:
    """Editing evidence: class-edit target accuracy against distance to the source (inversion edit and
    SDEdit at several strengths: a trade-off curve), inpainting accuracy and seam, example figures."""
    import torch

    from ddim.classifier import load_classifier
    from ddim.edit import check_strength
    from ddim.evaluation.edit import run_edit_eval
    from ddim.evaluation.sources import heldout_data, heldout_subset

    try:
        ss = [float(v) for v in strengths.split(",")]
        [check_strength(v) for v in ss]
    except ValueError as e:
        raise UsageError(f"--strengths: {e}") from None
    if not math.isfinite(guidance):
        raise UsageError(f"--guidance must be a finite number, got {guidance}")
    _check_out_folder(out)
    model, schedule, config = _load_model(model_path, device)
    if not int(getattr(model.config, "num_classes", 0) or 0):
        raise UsageError("--model: the edit evaluation needs a class-conditional model")
    try:
        d, _ = heldout_data(model, config, data)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--data: {e}") from None
    if d.labels is None:
        raise UsageError("--data: the edit evaluation needs labelled images")
    try:
        clf = load_classifier(classifier)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--classifier: {e}") from None
    d = heldout_subset(d, n)
    dev = torch.device(_check_device(device))
    rows = run_edit_eval(
        model, schedule, d.images.to(dev), d.labels.to(dev), clf, out, steps=steps, strengths=ss, guidance=guidance,
        prediction=config["prediction"], seed=seed,
    )  # fmt: skip
    click.echo((Path(out) / "edit.md").read_text())
    click.echo(f"-> {out}/edit.csv, edit.md, edit.png, edit_examples.png ({len(rows)} rows)")


@eval_group.command("consistency")
@_common
@click.option("--steps", "steps_list", default="10,20,50,100,200,500,1000", show_default=True, help="Step counts S.")
@click.option("--n", "-n", default=20, show_default=True, type=click.IntRange(min=2), help="Noises x_T.")
@click.option("--columns", default=8, show_default=True, type=click.IntRange(min=1), help="x_T shown in the grid.")
@click.option("--out", default="eval/consistency", show_default=True)
def consistency_cmd(run, steps_list, n, columns, out) -> None:
    """§5.2: one x_T decoded at each S; distance to the largest-S image against independent x_T."""
    from ddim.evaluation.consistency import run_consistency

    seed, progress = run["seed"], run["progress"]
    steps = _ints(steps_list, "--steps")
    _check_out_folder(out)
    _check_seeds(seed, n)
    setup, _ = _setup(run, steps=steps)
    _run_eval(
        out,
        "consistency.md",
        "consistency.png, consistency.csv, consistency.md",
        run_consistency,
        setup,
        out,
        steps=steps,
        n=n,
        columns=columns,
        progress=progress,
    )


@eval_group.command("interpolation")
@_common
@click.option("--pairs", default=4, show_default=True, type=click.IntRange(min=1), help="Strips (seed pairs).")
@click.option("--frames", default=9, show_default=True, type=click.IntRange(min=3))
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--out", default="eval/interpolation", show_default=True)
def interpolation_cmd(run, pairs, frames, steps, out) -> None:
    """§5.3: slerp strips between noises, and how even their steps are (largest / mean)."""
    from ddim.evaluation.interpolation import run_interpolation

    seed, progress = run["seed"], run["progress"]
    _check_out_folder(out)
    _check_seeds(seed, 2 * pairs)
    setup, _ = _setup(run)
    _run_eval(
        out,
        "interpolation.md",
        "interpolation.png, interpolation.csv, interpolation.md",
        run_interpolation,
        setup,
        out,
        pairs=pairs,
        frames=frames,
        steps=steps,
        progress=progress,
    )


@eval_group.command("samples")
@click.argument("source")
@_features
@click.option(
    "--batch",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images read and featurised at a time, per process.",
)
@click.option("--out", default=None, help="Also write the results to FILE.json or FILE.csv.")
@progress_option()
@_device_option
def samples_cmd(source, feats, batch, out, progress, device) -> None:
    """Fréchet distance, KID and precision/recall of images already made, against a reference set.

    SOURCE is a folder written by `ddim sample --out DIR/` (its seed_*.png; ddim-sample.json, temporary
    and other non-image files are skipped) or an .npz with `images` uint8 [N, H, W, C]. Under torchrun
    each process reads and featurises its share of the images and the statistics are gathered across
    the processes; the numbers equal a one-process run's.
    """
    from ddim import distributed as ddist
    from ddim.cli.common import _check_device
    from ddim.evaluation.extractors import load_extractor
    from ddim.evaluation.metrics import reference_features
    from ddim.evaluation.samples import evaluate_samples, format_results, write_results
    from ddim.evaluation.sources import samples_reference_data
    from ddim.shard import open_images

    features, inception_weights, data, cache = _feature_args(feats)
    if out is not None:
        _check_out_file(out, (".json", ".csv"))
    device = _check_device(ddist.local_device(device))
    ctx = ddist.init(device)

    def agreed(error: BaseException | None, what: str) -> None:
        """Every rank stops with the error when any rank met one."""
        try:
            ddist.check(error, ctx)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"{what}{e}") from None

    images, error = None, None
    try:
        images = open_images(source, exact=True)
    except ValueError as e:
        error = e
    agreed(error, "")
    spec = features or ("classifier" if images.shape[0] == 1 else "inception")
    try:
        extractor = load_extractor(spec, inception_weights=inception_weights).to(device)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except (ValueError, TypeError) as e:
        raise UsageError(f"--features: {e}") from None
    reference, error = None, None
    if ctx.is_main:  # the reference is needed (and cached) on rank 0 only
        try:
            ref_data, name = samples_reference_data(data, images.shape)
            reference = reference_features(ref_data.images, extractor, name=name, cache_dir=cache, progress=progress)
        except (ValueError, RuntimeError, OSError) as e:
            error = e
    agreed(error, "--data: ")
    try:
        result = evaluate_samples(images, extractor, reference, batch=batch, progress=progress and ctx.is_main)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if ctx.is_main:
        click.echo(format_results(result))
        if out is not None:
            write_results(result, out)
            click.echo(f"-> {out}")


_REPORT = ReportSettings()
_REPORT_STEPS = ",".join(map(str, _REPORT.steps))
_REPORT_ETAS = ",".join(e if isinstance(e, str) else f"{e:g}" for e in _REPORT.etas)
_REPORT_CONSISTENCY = ",".join(map(str, _REPORT.consistency_steps))


@main.command("report")
@_common
@_features
@click.option("--out", default="report.html", show_default=True, help="The HTML page (self-contained).")
@click.option("--work", default=None, help="Folder for results and caches [OUT without .html + '_files'].")
@click.option("--steps", "steps_list", default=_REPORT_STEPS, show_default=True, help="Table 1 and 2 step counts.")
@click.option("--eta", "eta_list", default=_REPORT_ETAS, show_default=True, help="Table 1 η values.")
@click.option(
    "--n", "-n", default=_REPORT.n, show_default=True, type=click.IntRange(min=4), help="Table 1 samples per cell."
)
@click.option(
    "--table2-n", default=_REPORT.table2_n, show_default=True, type=click.IntRange(min=1), help="Table 2 images."
)
@click.option(
    "--edit-n",
    default=_REPORT.edit_n,
    show_default=True,
    type=click.IntRange(min=0),
    help="Editing section: held-out images (class-conditional digit models; 0 = leave it out).",
)
@click.option("--heldout-data", default=None, help="Table 2 images (load_data spec) [MNIST-5k held-out digits].")
@click.option("--consistency-steps", default=_REPORT_CONSISTENCY, show_default=True, help="Consistency step counts.")
@click.option(
    "--consistency-n",
    default=_REPORT.consistency_n,
    show_default=True,
    type=click.IntRange(min=2),
    help="Consistency x_T.",
)
@click.option(
    "--pairs", default=_REPORT.pairs, show_default=True, type=click.IntRange(min=1), help="Interpolation strips."
)
@click.option(
    "--frames", default=_REPORT.frames, show_default=True, type=click.IntRange(min=3), help="Frames per strip."
)
@click.option(
    "--evidence/--no-evidence",
    default=True,
    show_default=True,
    help="Add guidance × steps, η and diversity, memorization and cost sections.",
)
@click.option("--train-data", default=None, help="The model's training images, for memorization [from its config].")
@click.option(
    "--straightness",
    "straightness_models",
    multiple=True,
    help="Add a straightness section comparing this model with another (folder or shipped name, e.g. reflow) at "
    "1, 2, 4, 8 Euler steps; repeatable.",
)
@click.option(
    "--few-calls",
    "few_calls",
    multiple=True,
    help="Add a row MODEL:SAMPLER:STEPS[:SPACING] to a few-calls section (MODEL 'self' = this model, else a "
    "folder or shipped name): e.g. --few-calls pd4:ddim:4 --few-calls cd:consistency:1 --few-calls "
    "self:dpmv3:5:trailing; Fréchet distance, accuracy and RMS to this model's DDIM-200 map. Repeatable.",
)
def report_cmd(
    run,
    feats,
    out,
    work,
    steps_list,
    eta_list,
    n,
    table2_n,
    edit_n,
    heldout_data,
    consistency_steps,
    consistency_n,
    pairs,
    frames,
    evidence,
    train_data,
    straightness_models,
    few_calls,
) -> None:
    """One self-contained HTML page with Table 1, Table 2, consistency and interpolation for a model, and
    (unless --no-evidence) guidance × steps, η and diversity, memorization and cost.

    Defaults are small (a few minutes on a CPU for the default model); raise --n and friends to scale
    up. Results are cached in --work, so a second run (or a killed one) only does what is missing.
    """
    from ddim.evaluation.report import ReportSettings, build_report
    from ddim.evaluation.sources import heldout_data as heldout
    from ddim.evaluation.sources import heldout_subset

    seed, progress = run["seed"], run["progress"]
    settings = ReportSettings(
        steps=_ints(steps_list, "--steps"),
        etas=_etas(eta_list),
        n=n,
        table2_n=table2_n,
        edit_n=edit_n,
        consistency_steps=_ints(consistency_steps, "--consistency-steps"),
        consistency_n=consistency_n,
        pairs=pairs,
        frames=frames,
        evidence=evidence,
        straightness=list(straightness_models),
        few_calls=list(few_calls),
    )
    from ddim.evaluation.straightness import FewCallRun

    try:
        few_models = {FewCallRun.parse(t).model for t in few_calls} - {"self"}
    except ValueError as e:
        raise UsageError(f"--few-calls {e}") from None
    for other in (*straightness_models, *sorted(few_models)):
        _load_model(other)  # a model that cannot be loaded fails before any work
    if len(set(settings.consistency_steps)) < 2:
        raise UsageError("--consistency-steps needs at least two step counts")
    _check_seeds(seed, max(n, consistency_n, 2 * pairs))
    out_path = _check_out_file(out, (".html", ".htm"))
    work_dir = _check_out_folder(work, "--work") if work else out_path.with_name(out_path.stem + "_files")
    if not work:
        _check_out_folder(str(work_dir), "--work")
    setup, config = _setup(run)
    extractor, reference = _extractor_and_reference(setup, config, feats, progress)
    try:
        held_all, held_name = heldout(setup.model, config, heldout_data)
        held = heldout_subset(held_all, table2_n)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--heldout-data: {e}") from None
    extra = {}
    if evidence:
        extra = _evidence_inputs(setup, config, extractor, feats, train_data, progress)
        extra["memorization_heldout"] = held_all.images
    try:
        build_report(
            setup,
            config,
            out_path,
            work_dir,
            extractor,
            reference,
            held.images,
            held_name,
            settings,
            progress=progress,
            heldout_labels=held.labels,
            **extra,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    click.echo(f"-> {out_path} (results in {work_dir}/)")


def _evidence_inputs(setup, config, extractor, feats: dict, train_data, progress) -> dict:
    """build_report's evidence inputs: the training images (None when unknown, unless --train-data names
    them), the reference set's labels, and the checking classifier's space for 1×28×28 digit models."""
    from ddim.evaluation.memorization import training_data

    features, data, cache = feats["features"], feats["data"], feats["cache"]
    out = {}
    try:
        train, out["train_name"] = training_data(setup.model, config, train_data)
        out["train"] = train.images
    except (ValueError, RuntimeError) as e:
        if train_data is not None:
            raise UsageError(f"--train-data: {e}") from None
    _, out["reference_labels"] = _reference_with_labels(setup, config, extractor, data, cache, progress)
    cfg = setup.model.config
    if features in (None, "classifier") and (cfg.in_channels, cfg.image_size) == (1, 28):
        check = _extractor(setup, "classifier-check", None)
        out["extra_spaces"] = [(check, _reference_with_labels(setup, config, check, data, cache, progress)[0])]
    return out


# ------------------------------------------------------------------ the evidence users ask for (issue 21)
def _grid(text: str, name: str, kind: type = int, minimum: float | None = None) -> list:
    """A comma list of distinct values >= ``minimum``, else a UsageError naming ``name``."""
    import math

    from ddim.evaluation.common import parse_list
    from ddim.evaluation.cost import check_grid

    try:
        values = check_grid(parse_list(text, kind, name), name, minimum=minimum, integer=kind is int)
    except ValueError as e:
        raise UsageError(str(e)) from None
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise UsageError(f"{name} values must be finite numbers, got {bad[0]}")
    return values


def _sampler_list(text: str) -> list[str]:
    from ddim.evaluation.cost import check_samplers

    try:
        return check_samplers([s.strip() for s in text.split(",") if s.strip()], "--sampler")
    except ValueError as e:
        raise UsageError(str(e)) from None


@eval_group.command("cost")
@_setup_options
@click.option("--steps", "steps_list", default="10,25,50,100", show_default=True, help="Step counts S (distinct).")
@click.option("--batches", "batch_list", default="1,16", show_default=True, help="Batch sizes (distinct).")
@click.option("--sampler", "sampler_list", default="ddim,ddpm,dpmpp_2m", show_default=True, help="Samplers.")
@eta_option("η of the ddim cells.")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1), help="Timed runs per cell.")
@click.option("--out", default="eval/cost", show_default=True, help="Output folder (resumes what it holds).")
def cost_cmd(run, steps_list, batch_list, sampler_list, eta, repeats, out) -> None:
    """Wall time, network calls and peak memory (RSS on CPU, CUDA allocated on GPU) against S and batch size.

    Writes OUT/cost.csv, cost.md (with, per sampler, whether memory depends on S), cost.png; cells are
    cached in OUT/cells (delete them to measure again).
    """
    from ddim.evaluation.cost import run_cost

    seed, progress = run["seed"], run["progress"]
    steps = _grid(steps_list, "--steps", int, 1)
    batches = _grid(batch_list, "--batches", int, 1)
    samplers = _sampler_list(sampler_list)
    _check_out_folder(out)
    _check_seeds(seed, max(batches))
    setup, _ = _setup(run, max(batches), steps=steps)
    _run_eval(
        out,
        "cost.md",
        "cost.csv, cost.md, cost.png",
        run_cost,
        setup,
        out,
        steps=steps,
        batches=batches,
        samplers=samplers,
        eta=eta,
        repeats=repeats,
        progress=progress,
    )


def _extractor(setup, features, inception_weights):
    from ddim.evaluation.sources import extractor_for

    try:
        return extractor_for(setup.model, features, inception_weights).to(setup.device)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except (ValueError, TypeError) as e:
        raise UsageError(f"--features: {e}") from None


_feature_options = [
    click.option(
        "--features",
        default=None,
        help="Feature extractor: 'classifier', 'inception', a TorchScript file or 'package.module:factory' "
        "[classifier for 1-channel images, else inception].",
    ),
    click.option("--inception-weights", default=None, type=click.Path(dir_okay=False), help="FID Inception weights."),
]


@eval_group.command("memorization")
@_setup_options
@_feature_options[0]
@_feature_options[1]
@click.option("--n", "-n", default=500, show_default=True, type=click.IntRange(min=1), help="Samples.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1), help="Sampling steps S.")
@eta_option("η (ddim).")
@click.option("--sampler", default="ddim", show_default=True, help="Sampler.")
@click.option("--pairs", default=8, show_default=True, type=click.IntRange(min=1), help="Closest pairs in the figure.")
@click.option("--train-data", default=None, help="The model's training images (load_data spec) [from its config].")
@click.option("--heldout-data", default=None, help="Real images it never saw [the 500 held-out MNIST-5k digits].")
@batch_option(50)
@click.option("--out", default="eval/memorization", show_default=True, help="Output folder (resumes what it holds).")
def memorization_cmd(
    run, features, inception_weights, n, steps, eta, sampler, pairs, train_data, heldout_data, batch, out
) -> None:
    """Does the model copy its training data? Each sample's nearest training image (pixels and features)
    against the nearest held-out image; the share of samples nearer a training image, beside real
    unseen images as a control; a figure of the closest pairs."""
    from ddim.evaluation.memorization import run_memorization, training_data
    from ddim.evaluation.sources import heldout_data as heldout

    seed, progress = run["seed"], run["progress"]
    _sampler_list(sampler)
    _check_out_folder(out)
    _check_seeds(seed, n)
    if pairs > n:
        raise UsageError(f"--pairs ({pairs}) must be at most --n ({n})")
    setup, config = _setup(run, batch)
    try:
        train, train_name = training_data(setup.model, config, train_data)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--train-data: {e}") from None
    try:
        held, held_name = heldout(setup.model, config, heldout_data)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--heldout-data: {e}") from None
    extractor = _extractor(setup, features, inception_weights)
    _run_eval(
        out,
        "memorization.md",
        "memorization.csv, memorization.md, memorization.png, memorization_hist.png",
        run_memorization,
        setup,
        out,
        extractor,
        train.images,
        held.images,
        n=n,
        steps=steps,
        eta=eta,
        sampler=sampler,
        pairs=pairs,
        train_name=train_name,
        heldout_name=held_name,
        progress=progress,
    )


def _reference_with_labels(setup, config, extractor, data, cache, progress):
    """(reference features, their labels or None) of the model's reference set (see --data)."""
    from ddim.evaluation.metrics import reference_features
    from ddim.evaluation.sources import reference_data

    try:
        ref_data, name = reference_data(setup.model, config, data)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--data: {e}") from None
    reference = reference_features(ref_data.images, extractor, name=name, cache_dir=cache, progress=progress)
    return reference, ref_data.labels


@eval_group.command("diversity")
@_setup_options
@_features
@click.option("--eta", "eta_list", default="0,0.2,0.5,1", show_default=True, help="DDIM η values (distinct).")
@click.option(
    "--sampler", "sampler_list", default="ddim,ddpm,dpmpp_2m,dpmpp_2m_sde", show_default=True, help="Samplers."
)
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1), help="Sampling steps S.")
@click.option("--n", "-n", default=500, show_default=True, type=click.IntRange(min=4), help="Samples per cell.")
@click.option("--seeds-shown", default=6, show_default=True, type=click.IntRange(min=1), help="Rows of the figure.")
@batch_option(50)
@click.option("--out", default="eval/diversity", show_default=True, help="Output folder (resumes what it holds).")
def diversity_cmd(run, feats, eta_list, sampler_list, steps, n, seeds_shown, batch, out) -> None:
    """η and diversity: within-class feature diversity, recall and quality for each η (DDIM) and sampler,
    and how far the same x_T's image moves as η grows."""
    from ddim.evaluation.diversity import run_diversity

    seed, progress = run["seed"], run["progress"]
    features, inception_weights, data, cache = _feature_args(feats)
    etas = _grid(eta_list, "--eta", float, 0.0)
    samplers = _sampler_list(sampler_list)
    _check_out_folder(out)
    _check_seeds(seed, n)
    if seeds_shown > n:
        raise UsageError(f"--seeds-shown ({seeds_shown}) must be at most --n ({n})")
    setup, config = _setup(run, batch)
    extractor = _extractor(setup, features, inception_weights)
    reference, labels = _reference_with_labels(setup, config, extractor, data, cache, progress)
    if n > len(reference.features):
        raise UsageError(f"--n ({n}) is larger than the reference set ({len(reference.features)} images)")
    _run_eval(
        out,
        "diversity.md",
        "diversity.csv, diversity.md, diversity.png, diversity_seeds.png",
        run_diversity,
        setup,
        out,
        extractor,
        reference,
        reference_labels=labels,
        etas=etas,
        samplers=samplers,
        steps=steps,
        n=n,
        seeds_shown=seeds_shown,
        progress=progress,
    )


@eval_group.command("guidance")
@_setup_options
@click.option(
    "--features",
    "features_list",
    default=None,
    help="Comma list of feature spaces, each judged apart: 'classifier', 'classifier-check' (the second, "
    "independently trained network), 'inception', a TorchScript file... "
    "[classifier,classifier-check for 1×28×28 models, else inception]",
)
@click.option("--inception-weights", default=None, type=click.Path(dir_okay=False), help="FID Inception weights.")
@click.option("--data", default=None, help="Reference images (as for `ddim eval table1`) [MNIST-5k for 28×28 digits].")
@click.option("--cache", default=None, type=click.Path(file_okay=False), help="Folder for cached reference features.")
@click.option("--guidances", "guidance_list", default="1,1.5,2,3,4", show_default=True, help="Guidance weights w.")
@click.option("--steps", "steps_list", default="10,20,50", show_default=True, help="Step counts S (distinct).")
@click.option("--sampler", "sampler_list", default="ddim", show_default=True, help="Samplers.")
@eta_option("η of the ddim cells.")
@click.option("--n", "-n", default=200, show_default=True, type=click.IntRange(min=4), help="Samples per cell.")
@click.option(
    "--min-accuracy",
    default=0.95,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="The default may only be a w whose class accuracy stays at or above this in every cell.",
)
@batch_option(50)
@click.option("--out", default="eval/guidance", show_default=True, help="Output folder (resumes what it holds).")
def guidance_cmd(
    run,
    features_list,
    inception_weights,
    data,
    cache,
    guidance_list,
    steps_list,
    sampler_list,
    eta,
    n,
    min_accuracy,
    batch,
    out,
) -> None:
    """Guidance × steps: Fréchet distance, precision, recall and class accuracy for each w, S and sampler in
    each feature space, the best w per step count marked, and the default w they point to."""
    from ddim.evaluation.guidance import run_guidance

    seed, progress = run["seed"], run["progress"]
    ws = _grid(guidance_list, "--guidances", float, 0.0)
    steps = _grid(steps_list, "--steps", int, 1)
    samplers = _sampler_list(sampler_list)
    _check_out_folder(out)
    _check_seeds(seed, n)
    setup, config = _setup(run, batch)
    if not setup.num_classes or setup.class_spec is None:
        raise UsageError("--class: guidance needs a class-conditional model and classes (not 'none')")
    if features_list is None:
        cfg = setup.model.config
        digits = (cfg.in_channels, cfg.image_size) == (1, 28)
        specs = ["classifier", "classifier-check"] if digits else [None]
    else:
        specs = [s.strip() for s in features_list.split(",") if s.strip()]
        if not specs or len(set(specs)) < len(specs):
            raise UsageError(f"--features must name distinct feature spaces, got {features_list!r}")
    spaces = []
    for spec in specs:
        extractor = _extractor(setup, spec, inception_weights)
        reference, _ = _reference_with_labels(setup, config, extractor, data, cache, progress)
        if n > len(reference.features):
            raise UsageError(f"--n ({n}) is larger than the reference set ({len(reference.features)} images)")
        spaces.append((extractor, reference))
    _run_eval(
        out,
        "guidance.md",
        "guidance.csv, guidance.md, guidance.png",
        run_guidance,
        setup,
        out,
        spaces,
        guidances=ws,
        steps=steps,
        samplers=samplers,
        n=n,
        eta=eta,
        min_accuracy=min_accuracy,
        progress=progress,
    )


@eval_group.command("straightness")
@click.option(
    "--model",
    "models",
    multiple=True,
    help="A model to measure (folder or shipped name), repeatable [default and reflow]; the first is the "
    "reference whose DDIM at --ref-steps is the converged map.",
)
@click.option("--paths", default=64, show_default=True, type=click.IntRange(min=1), help="ODE paths per model.")
@click.option("--path-steps", default=100, show_default=True, type=click.IntRange(min=2), help="Euler steps a path.")
@click.option("--n", default=200, show_default=True, type=click.IntRange(min=0), help="Images per row (0: no FD rows).")
@click.option("--calls", default="1,2,4,8", show_default=True, help="Euler (DDIM) steps of the rows.")
@click.option("--ref-steps", default=200, show_default=True, type=click.IntRange(min=1), help="DDIM steps of the map.")
@click.option(
    "--ref-rows",
    default="4,50",
    show_default=True,
    help="Also rows of the first model's DDIM at these steps on its leading spacing ('' for none).",
)
@click.option(
    "--seed",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(0, 2**32 - 1),
    help="Image i uses seed+i (the default keeps clear of the seeds 0..N-1 a reflow student was trained on).",
)
@click.option("--batch", default=100, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--out", default=None, help="Also write the tables to this .md file (and the figures to a .json beside it)."
)
@click.option(
    "--cache",
    default="eval/straightness",
    show_default=True,
    help="Folder keeping each run's images and paths (keyed by the weights and settings); 'none': no cache.",
)
def straightness_cmd(models, paths, path_steps, n, calls, ref_steps, ref_rows, seed, batch, out, cache) -> None:
    """How straight each model's ODE paths are (mean deviation from the chord between the path's ends, over
    its length, in the flow coordinate), and its Fréchet distance, accuracy and RMS to the first model's
    DDIM-REF-STEPS map at 1, 2, 4, 8 Euler calls, from the same noises (class i mod 10)."""
    import json

    from ddim.checkpoint import atomic_write
    from ddim.evaluation.straightness import ModelRun, few_step_rows, straightness, straightness_markdown

    steps = _grid(calls, "--calls", int, 1)
    extra = _grid(ref_rows, "--ref-rows", int, 1) if ref_rows.strip() else []
    if out is not None:
        _check_out_file(out, (".md",))
    names = list(models) or ["default", "reflow"]
    if len(set(names)) != len(names):
        raise UsageError(f"--model repeats a model: {names}")
    cache = None if cache == "none" else _check_out_folder(cache, "--cache")
    runs = {name: ModelRun(*_load_model(name)) for name in names}
    _check_seeds(seed, max(n, paths))
    deviations = {
        name: straightness(run, n=paths, steps=path_steps, seed=seed, batch=batch, cache=cache)
        for name, run in runs.items()
    }
    rows = []
    if n:
        rows = few_step_rows(
            runs, names[0], calls=steps, n=n, seed=seed, ref_steps=ref_steps, batch=batch, cache=cache,
            extra_reference_steps=extra,
        )  # fmt: skip
    text = straightness_markdown(deviations, rows)
    click.echo(text)
    if out is not None:
        atomic_write(out, lambda tmp: Path(tmp).write_text(text + "\n"))
        blob = json.dumps({"straightness": deviations, "rows": rows}, indent=2)
        atomic_write(Path(out).with_suffix(".json"), lambda tmp: Path(tmp).write_text(blob + "\n"))
