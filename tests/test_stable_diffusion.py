"""Stable Diffusion pipeline folders: `ddim sample --model SD --prompt` gives StableDiffusionPipeline's own
images (tiny random pipelines built from diffusers' and transformers' classes; nothing is downloaded)."""

import json
import shutil

import numpy as np
import pytest
import torch

import ddim
from ddim.cli import run
from ddim.images import to_uint8

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ddim.stable_diffusion import (  # noqa: E402
    StableDiffusionModel,
    invert_text_images,
    scheduler_timesteps,
    text_to_image,
)
from ddim.tiny_sd import tiny_stable_diffusion, write_tiny_tokenizer  # noqa: E402

PROMPTS = ["a red cat", "the dog and the cat"]
SD1 = {}  # the SD 1.x scheduler config of tiny_stable_diffusion: scaled_linear, leading, steps_offset=1
SD2V = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}  # zero terminal SNR, v-prediction

_BUILT: dict = {}


def _pipeline(tmp_path_factory, scheduler="DDIMScheduler", prediction="epsilon", cfg=None):
    """A saved tiny pipeline (built once per configuration) and the pipeline object; v-prediction
    pipelines have SD 2.x's layout."""
    key = (scheduler, prediction, json.dumps(cfg or {}, sort_keys=True))
    if key not in _BUILT:
        layout = "sd2" if prediction == "v_prediction" else "sd1"
        pipe = tiny_stable_diffusion(prediction=prediction, scheduler=scheduler, scheduler_config=cfg, layout=layout)
        pipe.set_progress_bar_config(disable=True)
        folder = tmp_path_factory.mktemp("sd") / "pipe"
        pipe.save_pretrained(folder)
        _BUILT[key] = (folder, pipe)
    return _BUILT[key]


def _reference(pipe, n, steps, negative=None, guidance=7.5, rescale=0.0) -> np.ndarray:
    """StableDiffusionPipeline's uint8 images: image i from prompt i mod 2 and its own CPU generator."""
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
    with torch.no_grad():
        img = pipe(
            [PROMPTS[i % len(PROMPTS)] for i in range(n)],
            negative_prompt=None if negative is None else [negative] * n,
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance,
            guidance_rescale=rescale,
            output_type="np",
        ).images
    return np.round(img * 255).astype(np.uint8)


def _cli(folder, tmp_path, n, steps, *extra) -> np.ndarray:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is skipped
    out = tmp_path / "ours.npz"
    args = ["sample", "--model", str(folder), "--n", str(n), "--steps", str(steps), "--prompts", str(prompts)]
    assert run([*args, "--out", str(out), "--no-progress", *extra]) == 0
    return np.load(out)["images"]


def _same(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape == (3, 16, 16, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert (ours != ref).mean() < 0.05  # almost every pixel exactly equal


CASES = [
    ("DDIMScheduler", "ddim", "epsilon", SD1),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", "epsilon", SD1),
    ("EulerDiscreteScheduler", "euler", "epsilon", {"timestep_spacing": "leading"}),
    ("UniPCMultistepScheduler", "unipc", "epsilon", SD1),
    ("DDIMScheduler", "ddim", "v_prediction", SD2V),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", "v_prediction", SD1),
]


@pytest.mark.parametrize("scheduler, sampler, prediction, cfg", CASES)
def test_cli_sample_equals_stable_diffusion_pipeline(tmp_path_factory, tmp_path, scheduler, sampler, prediction, cfg):
    folder, pipe = _pipeline(tmp_path_factory, scheduler, prediction, cfg)
    n, steps = 3, 10
    plain = _cli(folder, tmp_path, n, steps, "--sampler", sampler)
    _same(plain, _reference(pipe, n, steps))
    negative = _cli(folder, tmp_path, n, steps, "--sampler", sampler, "--negative-prompt", "red")
    _same(negative, _reference(pipe, n, steps, negative="red"))
    assert np.abs(plain.astype(int) - negative.astype(int)).max() > 2  # the negative prompt did something


def test_library_text_to_image_with_guidance_rescale_equals_pipeline(tmp_path_factory):
    folder, pipe = _pipeline(tmp_path_factory, "DDIMScheduler", "v_prediction", SD2V)
    model, schedule, config = ddim.load(folder)
    assert model.unet.config.use_linear_projection and model.text_encoder.config.hidden_act == "gelu"  # SD 2.x
    assert schedule.alphas_cumprod[-1] == 0  # zero terminal SNR, from the scheduler config
    ref = _reference(pipe, 3, 10, negative="dog", guidance=5.0, rescale=0.7)
    res = text_to_image(model, schedule, config, PROMPTS, negative_prompt="dog", n=3, steps=10, guidance=5.0,
                        guidance_rescale=0.7, batch=2)  # fmt: skip
    _same(to_uint8(res.images), ref)
    plain = text_to_image(model, schedule, config, PROMPTS, negative_prompt="dog", n=3, steps=10, guidance=5.0)
    assert (res.images - plain.images).abs().max() > 1e-3  # φ changed the images


def test_a_pndm_folder_as_sd_1_5_ships_samples_as_the_pipeline_with_ddim(tmp_path_factory, tmp_path):
    # SD 1.x folders ship a PNDMScheduler config; `--sampler ddim` is then StableDiffusionPipeline with
    # DDIMScheduler.from_config(that config): leading spacing, steps_offset=1, last step to ᾱ_0.
    folder, pipe = _pipeline(tmp_path_factory, "PNDMScheduler", "epsilon", {"skip_prk_steps": True})
    ddim_pipe = diffusers.StableDiffusionPipeline(
        **{**pipe.components, "scheduler": diffusers.DDIMScheduler.from_config(pipe.scheduler.config)}
    )
    ddim_pipe.set_progress_bar_config(disable=True)
    _same(_cli(folder, tmp_path, 3, 10), _reference(ddim_pipe, 3, 10))


def test_load_maps_the_pipeline(tmp_path_factory):
    folder, pipe = _pipeline(tmp_path_factory)
    model, schedule, config = ddim.load(folder)
    assert isinstance(model, StableDiffusionModel) and not model.training
    c = model.config
    assert (c.in_channels, c.image_size, c.vae_scale_factor, c.height, c.width, c.num_classes) == (4, 8, 2, 16, 16, 0)
    assert c.scaling_factor == pipe.vae.config.scaling_factor
    assert config["format"] == "stable-diffusion-pipeline" and config["prediction"] == "epsilon"
    assert config["sampling"]["guidance"] == 7.5 and config["sampling"]["steps_offset"] == 1
    torch.testing.assert_close(schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod.double(), rtol=1e-5, atol=0)
    with torch.no_grad():
        ours = model.encode_prompt(PROMPTS)
        theirs = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 800])
        torch.testing.assert_close(model(x, t, encoder_hidden_states=ours), pipe.unet(x, t, ours).sample)
    # image i's latents are ddim.randn of its seed: the pipeline's latents with one CPU generator per image
    gens = [torch.Generator("cpu").manual_seed(s) for s in (5, 6)]
    latents = pipe.prepare_latents(2, 4, 16, 16, torch.float32, "cpu", gens)
    torch.testing.assert_close(latents, ddim.randn((2, *model.latent_shape()), [5, 6]), rtol=0, atol=0)
    assert model.latent_shape(32, 48) == (4, 16, 24)


def test_scheduler_timesteps_are_the_pipeline_schedulers(tmp_path_factory):
    for scheduler, _, prediction, cfg in CASES:
        folder, pipe = _pipeline(tmp_path_factory, scheduler, prediction, cfg)
        _, _, config = ddim.load(folder)
        pipe.scheduler.set_timesteps(7)
        own = scheduler_timesteps(config, 7)
        assert own["timesteps"] == pipe.scheduler.timesteps.tolist()
        assert own["set_alpha_to_one"] is (scheduler != "DDIMScheduler")  # DDIM's SD config ends on ᾱ_0
    assert scheduler_timesteps({"scheduler": "PNDMScheduler", "scheduler_config": {}}, 7) is None


def test_a_tokenizer_given_as_vocab_and_merges_files(tmp_path_factory, tmp_path):
    folder, pipe = _pipeline(tmp_path_factory)
    copy = tmp_path / "pipe"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "tokenizer")  # the layout of real SD folders: vocab.json + merges.txt
    write_tiny_tokenizer(copy / "tokenizer")
    (copy / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    model, _, _ = ddim.load(copy)
    ids = model.tokenizer(PROMPTS, padding="max_length", max_length=16).input_ids
    assert ids == pipe.tokenizer(PROMPTS, padding="max_length", max_length=16).input_ids
    assert len(set(ids[1])) > 4  # words, not just padding
    # an unreadable vocabulary is one error naming the tokenizer
    (copy / "tokenizer" / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer"):
        ddim.load(copy)


def test_vae_decodes_in_slices_and_tiles(tmp_path_factory):
    folder, _ = _pipeline(tmp_path_factory)
    model, _, _ = ddim.load(folder)
    z = ddim.randn((3, 4, 8, 8), [0, 1, 2])
    seen = []
    real = model.vae.decode
    model.vae.decode = lambda x, **kw: (seen.append(x.shape[0]), real(x, **kw))[1]
    model.vae_batch = 3
    whole = model.decode(z)
    model.vae_batch = 1
    sliced = model.decode(z)
    assert seen == [3, 1, 1, 1] and whole.shape == (3, 3, 16, 16)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    model.vae.decode = real
    model.vae.tile_sample_min_size, model.vae.tile_latent_min_size = 8, 4  # tiles of 4×4 latents
    tiles = []
    real_tiled = model.vae.tiled_decode
    model.vae.tiled_decode = lambda x, **kw: (tiles.append(x.shape), real_tiled(x, **kw))[1]
    model.vae_tiling = True
    tiled = model.decode(z)
    assert tiles and tiled.shape == whole.shape and torch.isfinite(tiled).all()
    # the round trip through the encoder: latents of the decoded images have the latent shape
    assert model.encode(whole).shape == (3, 4, 8, 8)


def test_inversion_round_trip_error_falls_with_steps(tmp_path_factory, tmp_path):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for prediction, cfg, factor in (("v_prediction", SD2V, 3.0), ("epsilon", SD1, 1.2)):
        # (a random ε-network's x̂₀ = (x - √(1-ᾱ) ε̂)/√ᾱ is huge at high noise: a stiff ODE, slower to converge)
        folder, _ = _pipeline(tmp_path_factory, "DDIMScheduler", prediction, cfg)
        model, schedule, config = ddim.load(folder)
        errs = [invert_text_images(model, schedule, config, images, "a red cat", steps=s)["latent_mse"].mean().item()
                for s in (5, 20, 80)]  # fmt: skip
        assert errs[0] > factor * errs[1] > factor**2 * errs[2] > 0, (prediction, errs)
    folder, _ = _pipeline(tmp_path_factory)
    # the command: encode with the VAE, invert under the prompt, write latents and the error
    from PIL import Image

    Image.fromarray(np.asarray(torch.rand(20, 24, 3).mul(255).byte())).save(tmp_path / "im.png")
    out = tmp_path / "inv"
    assert run(["invert", str(tmp_path / "im.png"), "--model", str(folder), "--prompt", "a cat", "--steps", "5",
                "--out", str(out)]) == 0  # fmt: skip
    saved = np.load(out / "latents.npz")
    assert saved["latents"].shape == (1, 4, 8, 8) and saved["latent_mse"][0] > 0


def _one_error_line(capsys, args) -> str:
    capsys.readouterr()
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_is_one_line_naming_the_part(tmp_path_factory, tmp_path, capsys):
    folder, _ = _pipeline(tmp_path_factory)
    out = str(tmp_path / "x.npz")
    # a missing component folder, and a component model_index.json does not name
    for part in ("vae", "text_encoder", "unet"):
        broken = tmp_path / f"no_{part}"
        shutil.copytree(folder, broken)
        shutil.rmtree(broken / part)
        assert part in _one_error_line(capsys, ["sample", "--model", str(broken), "--out", out])
    broken = tmp_path / "null_tokenizer"
    shutil.copytree(folder, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "tokenizer": [None, None]}))
    assert "tokenizer" in _one_error_line(capsys, ["sample", "--model", str(broken), "--out", out])
    # SDXL is refused, saying so
    (broken / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": index["text_encoder"]}))
    assert "SDXL" in _one_error_line(capsys, ["sample", "--model", str(broken), "--out", out])
    # a prompt on a model without a text encoder (the embedded MNIST model)
    line = _one_error_line(capsys, ["sample", "--prompt", "a cat", "--out", out])
    assert "--prompt" in line and "text encoder" in line
    # a size the VAE cannot take (its factor is 2 here)
    line = _one_error_line(capsys, ["sample", "--model", str(folder), "--height", "17", "--out", out])
    assert "--height" in line and "multiples of 2" in line
    # prompts: both forms, an empty file
    (tmp_path / "empty.txt").write_text("\n")
    assert "--prompt" in _one_error_line(
        capsys, ["sample", "--model", str(folder), "--prompt", "a", "--prompts", str(tmp_path / "empty.txt")]
    )
    assert "--prompts" in _one_error_line(
        capsys, ["sample", "--model", str(folder), "--prompts", str(tmp_path / "empty.txt"), "--out", out]
    )
    # commands without prompts refuse SD folders
    line = _one_error_line(capsys, ["interpolate", "--model", str(folder), "--out", str(tmp_path / "i.png")])
    assert "interpolate" in line
    # the library refuses a model call without text embeddings
    model, schedule, _ = ddim.load(folder)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ddim.sample(model, torch.zeros(1, 4, 8, 8), schedule, steps=2)


def test_bench_has_a_tiny_sd_row():
    from ddim.bench import format_table, sd_bench_rows

    rows = sd_bench_rows(batches=[2], algorithms=["DPM-Solver++-10"], repeats=1)
    (row,) = rows
    assert row.model == "tiny-sd" and row.ours.calls == row.diffusers.calls == 10
    assert row.max_diff < 1e-4  # both made the same images
    assert "tiny-sd" in format_table(rows)


def test_every_sampler_runs_unchanged_and_image_i_depends_only_on_its_seed(tmp_path_factory):
    folder, _ = _pipeline(tmp_path_factory)
    model, schedule, config = ddim.load(folder)
    for sampler in sorted(ddim.SAMPLERS):
        eta = 1.0 if sampler in ("ddpm",) else 0.0
        res = text_to_image(model, schedule, config, PROMPTS, n=2, steps=6, sampler=sampler, eta=eta)
        assert res.images.shape == (2, 3, 16, 16) and torch.isfinite(res.images).all(), sampler
        assert res.nfe == ddim.nfe(sampler, 6)
    whole = text_to_image(model, schedule, config, PROMPTS, n=3, steps=4, eta=1.0, batch=3)
    one = text_to_image(model, schedule, config, PROMPTS, seeds=[2], seed=0, steps=4, eta=1.0, batch=1)
    torch.testing.assert_close(one.images[0], whole.images[2], rtol=1e-4, atol=1e-4)  # seed 2, prompt 2 mod 2


def test_reduced_precision(tmp_path_factory, tmp_path):
    folder, _ = _pipeline(tmp_path_factory)
    full = _cli(folder, tmp_path, 3, 4)
    bf16 = _cli(folder, tmp_path, 3, 4, "--dtype", "bf16")  # UNet, text encoder and VAE in bf16
    assert np.abs(full.astype(int) - bf16.astype(int)).mean() < 2
    # an fp16 VAE with force_upcast (SD 1.x/2.x's) decodes in float32, as diffusers' upcast_vae
    model, _, _ = ddim.load(folder)
    model.vae.half()
    assert model.vae.config.force_upcast and model._vae_dtype() == torch.float32
    assert next(model.vae.parameters()).dtype == torch.float32


def test_a_resumed_folder_keeps_prompt_i_mod_p_and_seed_k_plus_i(tmp_path_factory, tmp_path):
    from PIL import Image

    folder, _ = _pipeline(tmp_path_factory)
    whole = _cli(folder, tmp_path, 4, 3, "--seed", "5")
    prompts = tmp_path / "prompts.txt"
    out = tmp_path / "shots"
    base = ["sample", "--model", str(folder), "--steps", "3", "--seed", "5", "--prompts", str(prompts)]
    assert run([*base, "--n", "3", "--out", str(out), "--no-progress"]) == 0
    assert run([*base, "--n", "4", "--out", str(out), "--no-progress"]) == 0  # makes only image 3 (seed 8)
    for i in range(4):
        with Image.open(out / f"seed_{5 + i:06d}.png") as im:
            np.testing.assert_array_equal(np.asarray(im), whole[i])
