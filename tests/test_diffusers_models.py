"""diffusers pipeline folders in: ddim.load and `ddim sample --model` on a saved DDIMPipeline give the
pipeline's own images."""

import json

import numpy as np
import pytest
import torch

import ddim
from ddim.cli import run
from ddim.diffusers_io import DiffusersModel, sampling_kwargs, schedule_from_scheduler_config

diffusers = pytest.importorskip("diffusers")


def _tiny_unet(seed: int = 0) -> "diffusers.UNet2DModel":
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def _pipeline_folder(tmp_path, default_config=False, **scheduler):
    # default_config: diffusers' own DDIMScheduler defaults (clip_sample=True among them)
    cfg = {} if default_config else dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    cfg.update(scheduler)
    pipe = diffusers.DDIMPipeline(unet=_tiny_unet(), scheduler=diffusers.DDIMScheduler(**cfg))
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    return folder, pipe


def _pipeline_uint8(pipe, n, steps, eta=0.0, **kw) -> np.ndarray:
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(n)]  # one CPU generator per sample
    with torch.no_grad():
        img = pipe(batch_size=n, generator=gens, num_inference_steps=steps, eta=eta, output_type="np", **kw).images
    return np.round(img * 255).astype(np.uint8)


def _library_uint8(folder, n, steps, eta, **options) -> np.ndarray:
    from ddim.generate import generate
    from ddim.images import to_uint8

    model, schedule, config = ddim.load(folder)
    kw = {**sampling_kwargs(config, schedule, steps), **options}
    spacing, timesteps, clip = kw.pop("spacing"), kw.pop("timesteps"), kw.pop("clip_sample")
    res = generate(
        model,
        schedule,
        n=n,
        steps=steps,
        eta=eta,
        spacing=spacing,
        timesteps=timesteps,
        clip_sample=clip,
        prediction=config["prediction"],
        sample_kwargs=kw,
    )
    return to_uint8(res.images)


def _cli_uint8(folder, tmp_path, n, steps, *extra) -> np.ndarray:
    out = tmp_path / "ours.npz"
    args = ["sample", "--model", str(folder), "--n", str(n), "--steps", str(steps), "--out", str(out)]
    assert run([*args, "--no-progress", *extra]) == 0
    return np.load(out)["images"]


CASES = [
    (dict(steps_offset=1, set_alpha_to_one=False), 0.0, {}),  # leading + offset, ends on ᾱ_0
    (dict(timestep_spacing="trailing"), 1.0, {}),  # stochastic: step noise from the same generators
    # clipping, diffusers' default: DDIMPipeline keeps the model's ε̂ (use_clipped_model_output off)
    (dict(default_config=True), 0.0, {}),
    (dict(default_config=True), 1.0, {}),
    (dict(clip_sample=True, prediction_type="v_prediction"), 0.0, {}),
    # and the other setting, asked for on both sides
    (dict(default_config=True), 0.0, {"use_clipped_model_output": True}),
    (dict(clip_sample=True, prediction_type="v_prediction"), 0.0, {"use_clipped_model_output": True}),
]


def _cli_flags(call: dict) -> list[str]:
    return ["--use-clipped-model-output"] if call.get("use_clipped_model_output") else []


def _check_same_images(ours: np.ndarray, ref: np.ndarray, n: int) -> None:
    assert ours.shape == ref.shape == (n, 8, 8, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert (ours != ref).mean() < 0.01  # and almost all pixels exactly equal (all, on this machine)


@pytest.mark.parametrize("scheduler, eta, call", CASES)
def test_cli_sample_of_a_pipeline_folder_equals_ddim_pipeline(tmp_path, scheduler, eta, call):
    folder, pipe = _pipeline_folder(tmp_path, **scheduler)
    n, steps = 3, 10  # 10 divides T, where diffusers' "previous timestep" t - T//S is the next listed one
    ref = _pipeline_uint8(pipe, n, steps, eta, **call)
    _check_same_images(_cli_uint8(folder, tmp_path, n, steps, "--eta", str(eta), *_cli_flags(call)), ref, n)


@pytest.mark.parametrize("scheduler, eta, call", CASES)
def test_library_sampling_of_a_pipeline_folder_equals_ddim_pipeline(tmp_path, scheduler, eta, call):
    folder, pipe = _pipeline_folder(tmp_path, **scheduler)
    ref = _pipeline_uint8(pipe, 3, 10, eta, **call)
    _check_same_images(_library_uint8(folder, 3, 10, eta, **call), ref, 3)


def test_the_two_clipping_settings_differ_on_the_default_config(tmp_path):
    # the parity above is not vacuous: on diffusers' default config the two settings give other images
    folder, pipe = _pipeline_folder(tmp_path, default_config=True)
    keep = _library_uint8(folder, 3, 10, 0.0)
    recompute = _library_uint8(folder, 3, 10, 0.0, use_clipped_model_output=True)
    assert np.abs(keep.astype(int) - recompute.astype(int)).max() > 8


@pytest.mark.parametrize("steps, call", [(10, {}), (20, {}), (10, {"use_clipped_model_output": True})])
def test_ddpm_pipeline_folder_with_default_clipping_equals_ddpm_pipeline(tmp_path, steps, call):
    # DDPMScheduler's defaults clip x̂₀; its posterior mean uses the clipped x̂₀ and x_t (so the ε̂ setting
    # does not matter), its variance is β̃ between the respaced levels, and the last step adds no noise.
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=diffusers.DDPMScheduler())
    pipe.save_pretrained(tmp_path / "ddpm")
    n = 3
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
    with torch.no_grad():
        img = pipe(batch_size=n, generator=gens, num_inference_steps=steps, output_type="np").images
    ref = np.round(img * 255).astype(np.uint8)
    ours = _cli_uint8(tmp_path / "ddpm", tmp_path, n, steps, "--sampler", "ddpm", *_cli_flags(call))
    _check_same_images(ours, ref, n)


@pytest.mark.parametrize("steps", [7, 30])
def test_pipeline_folder_keeps_diffusers_leading_where_steps_do_not_divide_T(tmp_path, steps):
    # diffusers' leading is k·(T//S); the package's own is ⌊i·T/S⌋: a pipeline folder keeps diffusers'
    folder, pipe = _pipeline_folder(tmp_path)
    model, schedule, config = ddim.load(folder)
    pipe.scheduler.set_timesteps(steps)
    assert sampling_kwargs(config, schedule, steps)["timesteps"] == pipe.scheduler.timesteps.tolist()
    assert int(ddim.timesteps(schedule, steps, "leading")[0]) > pipe.scheduler.timesteps[0]
    ref = _pipeline_uint8(pipe, 2, steps)
    _check_same_images(_cli_uint8(folder, tmp_path, 2, steps), ref, 2)


def test_load_maps_the_scheduler_config(tmp_path):
    folder, pipe = _pipeline_folder(
        tmp_path,
        timestep_spacing="trailing",
        steps_offset=1,
        clip_sample=True,
        clip_sample_range=2.0,
        prediction_type="sample",
        set_alpha_to_one=False,
    )
    model, schedule, config = ddim.load(folder)
    assert isinstance(model, DiffusersModel) and not model.training
    assert (model.config.image_size, model.config.in_channels, model.config.num_classes) == (8, 3, 0)
    assert config["prediction"] == "sample" and config["format"] == "diffusers-pipeline"
    s = config["sampling"]
    assert (s["spacing"], s["steps_offset"], s["clip_sample"], s["clip_sample_range"]) == ("trailing", 1, True, 2.0)
    assert s["set_alpha_to_one"] is False
    torch.testing.assert_close(schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod.double(), rtol=1e-5, atol=0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), pipe.unet(x, t).sample)
    kw = sampling_kwargs(config, schedule, 10)
    assert kw["spacing"] == "trailing" and kw["timesteps"] is None  # the offset only shifts "leading"
    assert kw["clip_sample"] and kw["clip_sample_range"] == 2.0 and kw["set_alpha_to_one"] is False
    lead = sampling_kwargs(config, schedule, 10, spacing="leading")
    assert lead["timesteps"] == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    pipe.scheduler.set_timesteps(10)  # diffusers' own "leading" list with the offset
    with pytest.raises(ValueError, match="steps_offset"):
        sampling_kwargs(config, schedule, 1000, spacing="leading")


@pytest.mark.parametrize(
    "cfg",
    [
        dict(beta_schedule="linear"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="linear", rescale_betas_zero_snr=True),
        dict(trained_betas=torch.linspace(1e-4, 0.03, 100).tolist(), num_train_timesteps=100),
    ],
)
def test_schedules_match_diffusers(cfg):
    ours = schedule_from_scheduler_config(cfg)
    theirs = diffusers.DDIMScheduler(**cfg).alphas_cumprod.double()
    torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=2e-5, atol=1e-7)


def test_ddpm_pipeline_folder_and_errors(tmp_path):
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=diffusers.DDPMScheduler(variance_type="fixed_large"))
    pipe.save_pretrained(tmp_path / "ddpm")
    model, schedule, config = ddim.load(tmp_path / "ddpm")
    assert config["scheduler"] == "DDPMScheduler" and config["sampling"]["variance"] == "large"
    x = ddim.sample(model, ddim.randn((2, 3, 8, 8), [0, 1]), schedule, steps=4, sampler="ddpm", seeds=[0, 1])
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    # a pipeline whose network is not a UNet2DModel is refused with a one-line usage error
    index = json.loads((tmp_path / "ddpm" / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (tmp_path / "ddpm" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="UNet2DModel"):
        ddim.load(tmp_path / "ddpm")
    assert run(["sample", "--model", str(tmp_path / "ddpm"), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
