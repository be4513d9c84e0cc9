"""Images/s and peak memory of text to image with an SD-1.5-size pipeline with random weights.

Builds (nothing is downloaded) a ``UNet2DConditionModel``, ``AutoencoderKL`` and ``CLIPTextModel`` with
Stable Diffusion 1.5's configurations and random weights, and times ``ddim.stable_diffusion.text_to_image``
against ``StableDiffusionPipeline.__call__`` on the same components: 512×512 images, classifier-free
guidance 7.5, DDIM (50 steps by default), at each batch size. Peak memory is
``torch.cuda.max_memory_allocated`` per call. A benchmark for a GPU (fp16), never a test::

    python scripts/sd_gpu_bench.py --device cuda --dtype fp16 --batches 1,8
    python scripts/sd_gpu_bench.py --small --steps 3 --batches 1    # a CPU smoke run with tiny components
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch


def build(small: bool, device: str, dtype: torch.dtype):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ddim.schedule import NoiseSchedule
    from ddim.stable_diffusion import StableDiffusionModel
    from ddim.tiny_sd import tiny_stable_diffusion, write_tiny_tokenizer

    sched_cfg = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip
    if small:
        p = tiny_stable_diffusion()
        unet, vae, te, tok = p.unet, p.vae, p.text_encoder, p.tokenizer
    else:
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
        )  # fmt: skip
        vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, layers_per_block=2, sample_size=512,
        )  # fmt: skip
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                          bos_token_id=0, eos_token_id=1, pad_token_id=1))  # fmt: skip
        d = write_tiny_tokenizer(tempfile.mkdtemp(prefix="sd-tok-"))
        tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)
    model = StableDiffusionModel(unet.eval(), vae.eval(), te.eval(), tok).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    from ddim.diffusers_io import _sampling_config

    schedule = NoiseSchedule.scaled_linear(1000, 0.00085, 0.012)
    config = {
        "format": "stable-diffusion-pipeline", "prediction": "epsilon",
        "sampling": {**_sampling_config(sched_cfg), "guidance": 7.5},
        "scheduler": "DDIMScheduler", "scheduler_config": sched_cfg,
    }  # fmt: skip
    sched = diffusers.DDIMScheduler.from_config(sched_cfg)
    pipe = diffusers.StableDiffusionPipeline(
        unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=tok, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return model, schedule, config, pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny components (a smoke run)")
    args = ap.parse_args()
    from ddim.stable_diffusion import text_to_image

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cuda = args.device.startswith("cuda")
    model, schedule, config, pipe = build(args.small, args.device, dtype)
    n_params = sum(p.numel() for p in model.unet.parameters())
    print(f"UNet {n_params / 1e6:.0f}M parameters, {args.dtype} on {args.device}, {args.steps} DDIM steps")
    print("| loop | batch | seconds | images/s | peak memory |")
    print("|---|---:|---:|---:|---:|")
    prompt = "a red cat and the dog"
    for B in [int(b) for b in args.batches.split(",")]:

        def ours(B=B):
            return text_to_image(model, schedule, config, prompt, n=B, steps=args.steps, batch=B, device=args.device)

        def theirs(B=B):
            gens = [torch.Generator("cpu").manual_seed(i) for i in range(B)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pipe([prompt] * B, num_inference_steps=args.steps, generator=gens, output_type="pt")

        for name, fn in (("ddim", ours), ("StableDiffusionPipeline", theirs)):
            with torch.inference_mode():
                fn()  # warm-up
                best, peak = float("inf"), 0
                for _ in range(args.repeats):
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    tic = time.perf_counter()
                    fn()
                    if cuda:
                        torch.cuda.synchronize()
                        peak = max(peak, torch.cuda.max_memory_allocated())
                    best = min(best, time.perf_counter() - tic)
            mem = f"{peak / 2**30:.2f} GiB" if cuda else "n/a (CPU)"
            print(f"| {name} | {B} | {best:.2f} | {B / best:.2f} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
