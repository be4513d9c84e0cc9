"""What ``ddim serve`` computes, with one loaded model: drafts, interpolation frames, reconstructions and edits.

Each method takes settings already checked by :func:`ddim.serve.params.read_params` and calls the
library (:func:`ddim.generate.generate`, :func:`ddim.sample`, :func:`ddim.invert`, :mod:`ddim.edit`); it
returns uint8 images [N, H, W, C] and a dict of facts (network calls). Nothing here knows about HTTP.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np
import torch

from ddim.diffusers_io import sampling_kwargs
from ddim.edit import class_swap, inpaint, sdedit
from ddim.generate import generate
from ddim.images import from_uint8, to_uint8
from ddim.interpolate import slerp
from ddim.noise import randn
from ddim.sampling import invert, nfe, sample
from ddim.schedule import NoiseSchedule
from ddim.serve.engine import ShuttingDown

__all__ = ["Drafts", "image_key"]


class _Stoppable:
    """The model, called as itself, unless ``stop`` is set: then the call raises ShuttingDown."""

    def __init__(self, model: torch.nn.Module, stop: threading.Event) -> None:
        self.model, self.stop, self.config = model, stop, model.config

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> Any:
        if self.stop.is_set():
            raise ShuttingDown("the server is shutting down")
        return self.model(x, t, **kwargs)


def image_key(u8: np.ndarray) -> str:
    """A content key of a uint8 image (the same pixels give the same key, whatever file they came in)."""
    return hashlib.sha256(np.ascontiguousarray(u8).tobytes() + repr(u8.shape).encode()).hexdigest()[:32]


class Drafts:
    """Computations for the server, on one model kept warm.

    Args:
        model: the network (e.g. :func:`ddim.perf.prepare`'d), on ``device``.
        schedule: its training schedule.
        config: the config of :func:`ddim.load` (prediction type, sampling defaults).
        device: where the model lives.
        stop: when set, the next network call raises :class:`~ddim.serve.engine.ShuttingDown`, so a long
            job ends within one step of a shutdown (the calls are otherwise the model's own).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: NoiseSchedule,
        config: dict[str, Any],
        device: str,
        stop: threading.Event | None = None,
    ) -> None:
        self.network = model
        self.model = model if stop is None else _Stoppable(model, stop)
        self.schedule = schedule
        self.config = config
        self.device = torch.device(device)
        cfg = model.config
        size = getattr(cfg, "image_size", None) or cfg.sample_size  # ours, or a diffusers UNet2DModel's
        self.shape = (int(cfg.in_channels), int(size), int(size))
        self.num_classes = int(getattr(cfg, "num_classes", 0) or 0)
        self.prediction = config.get("prediction", "epsilon")

    # ------------------------------------------------------------------ helpers
    def sampling(self, steps: int, spacing: str) -> dict[str, Any]:
        """The model's sampling arguments (clipping, offsets, the timesteps) for ``steps`` and ``spacing``.
        "optimized" is the model's list for ``steps``; a model whose own spacing is "optimized" falls back
        to its ``fallback_spacing`` where it has none (:func:`ddim.diffusers_io.model_spacing`), any other
        model refuses such a request (ValueError: a 400)."""
        own = (self.config.get("sampling") or {}).get("spacing")
        return sampling_kwargs(self.config, self.schedule, steps, None if spacing == own == "optimized" else spacing)

    def named_spacing(self, spacing: str) -> str:
        """The spacing of the editing features (inversion, swap, SDEdit, inpainting take a spacing name, and
        SDEdit's timesteps depend on its strength): ``spacing``, or for "optimized" the model's
        ``fallback_spacing`` (default "trailing")."""
        if spacing != "optimized":
            return spacing
        return str((self.config.get("sampling") or {}).get("fallback_spacing", "trailing"))

    def condition(self, label: int, n: int, guidance: float) -> tuple[dict, dict | None, float]:
        """(model_kwargs, uncond_kwargs, guidance_scale) for n images of class ``label`` (-1 = none), as
        :func:`ddim.generate.generate` builds them: guidance only for a class-conditional request."""
        if not self.num_classes:
            return {}, None, 1.0
        y = torch.full((n,), self.num_classes if label < 0 else label, dtype=torch.long, device=self.device)
        guided = guidance != 1.0 and label >= 0
        return {"y": y}, {"y": torch.full_like(y, self.num_classes)}, (guidance if guided else 1.0)

    def to_model(self, u8: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1] on the model's device."""
        return from_uint8(u8).to(self.device)

    # ------------------------------------------------------------------ the features
    def sample(self, p: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """One draft: image i = seed ``p["seed"]``, exactly :func:`ddim.generate.generate` (hence
        :func:`ddim.sample`) with these settings. Returns uint8 [1, H, W, C] and {"nfe"}."""
        skw = self.sampling(p["steps"], p["spacing"])
        label = p["class"]
        res = generate(
            self.model,
            self.schedule,
            seeds=[p["seed"]],
            labels=torch.tensor([label]) if self.num_classes else None,
            guidance=p["guidance"],
            steps=p["steps"],
            eta=p["eta"],
            spacing=skw.pop("spacing"),
            sampler=p["sampler"],
            timesteps=skw.pop("timesteps"),
            prediction=self.prediction,
            clip_sample=skw.pop("clip_sample"),
            image_shape=self.shape,
            keep="uint8",
            device=self.device,
            sample_kwargs=skw,
        )
        return res.uint8, {"nfe": res.nfe}

    def frame(self, p: dict[str, Any], k: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Frame k of a slerp strip of ``p["frames"]`` frames between the noises of ``seed_a`` and ``seed_b``:
        x_T = slerp(z_a, z_b, k / (frames - 1)), sampled with a deterministic sampler. Returns uint8
        [1, H, W, C] and {"nfe"}."""
        za = randn((1, *self.shape), [p["seed_a"]])[0]
        zb = randn((1, *self.shape), [p["seed_b"]])[0]
        x_T = slerp(za, zb, torch.linspace(0, 1, p["frames"])[k : k + 1]).to(self.device)
        kwargs, uncond, g = self.condition(p["class"], 1, p["guidance"])
        skw = self.sampling(p["steps"], p["spacing"])
        with torch.inference_mode():
            x = sample(
                self.model,
                x_T,
                self.schedule,
                steps=p["steps"],
                sampler=p["sampler"],
                prediction=self.prediction,
                model_kwargs=kwargs,
                guidance_scale=g,
                uncond_kwargs=uncond if g != 1.0 else None,
                **skw,
            )
        return to_uint8(x), {"nfe": nfe(p["sampler"], p["steps"])}

    def invert(self, u8: np.ndarray, steps: int, spacing: str, label: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Plain DDIM inversion (:func:`ddim.invert`) of uint8 [1, H, W, C] under class ``label``
        (-1 = the null class): x_T float [1, C, H, W] and {"nfe"}."""
        kwargs, _, _ = self.condition(label, u8.shape[0], 1.0)
        with torch.inference_mode():
            z = invert(
                self.model,
                self.to_model(u8),
                self.schedule,
                steps=steps,
                spacing=self.named_spacing(spacing),
                prediction=self.prediction,
                model_kwargs=kwargs,
            )
        return z, {"nfe": steps}

    def reconstruct(self, u8: np.ndarray, p: dict[str, Any], latents: torch.Tensor) -> tuple[np.ndarray, dict]:
        """Decode inverted ``latents`` on the same timesteps (η = 0, no clipping): the DDIM round trip.
        Returns uint8 [1, H, W, C] and {"nfe", "mse"} (per-dimension MSE on [0, 1] against the upload)."""
        kwargs, _, _ = self.condition(p["class"], 1, 1.0)
        with torch.inference_mode():
            rec = sample(
                self.model,
                latents,
                self.schedule,
                steps=p["steps"],
                spacing=self.named_spacing(p["spacing"]),
                prediction=self.prediction,
                model_kwargs=kwargs,
            )
        x = self.to_model(u8)
        mse = float((((rec.clamp(-1, 1) - x) / 2) ** 2).mean())
        return to_uint8(rec), {"nfe": p["steps"], "mse": mse}

    def swap(self, u8: np.ndarray, p: dict[str, Any], latents: torch.Tensor) -> tuple[np.ndarray, dict]:
        """Class swap (:func:`ddim.edit.class_swap`) from ``latents`` inverted under ``p["source"]``."""
        src, _, _ = self.condition(p["source"], 1, 1.0)
        tgt, uncond, g = self.condition(p["target"], 1, p["guidance"])
        with torch.inference_mode():
            out, _ = class_swap(
                self.model,
                self.schedule,
                self.to_model(u8),
                source_kwargs=src,
                target_kwargs=tgt,
                uncond_kwargs=uncond,
                guidance_scale=g,
                steps=p["steps"],
                spacing=self.named_spacing(p["spacing"]),
                prediction=self.prediction,
                latents=latents,
            )
        return to_uint8(out), {"nfe": p["steps"]}

    def _edit_kwargs(self, p: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments :func:`ddim.edit.sdedit` and :func:`ddim.edit.inpaint` share: seed, steps,
        spacing, η, the class condition with its guidance, and the model's prediction and clipping."""
        kwargs, uncond, g = self.condition(p["class"], 1, p["guidance"])
        spacing = self.named_spacing(p["spacing"])
        skw = self.sampling(p["steps"], spacing)
        return {
            "seeds": [p["seed"]],
            "steps": p["steps"],
            "spacing": spacing,
            "eta": p["eta"],
            "model_kwargs": kwargs,
            "uncond_kwargs": uncond,
            "guidance_scale": g,
            "prediction": self.prediction,
            "clip_sample": skw["clip_sample"],
            "use_clipped_model_output": skw.get("use_clipped_model_output", False),
        }

    def sdedit(self, u8: np.ndarray, p: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """SDEdit (:func:`ddim.edit.sdedit`) of the upload at ``p["strength"]``."""
        with torch.inference_mode():
            out = sdedit(
                self.model,
                self.schedule,
                self.to_model(u8),
                p["strength"],
                **self._edit_kwargs(p),
            )
        return to_uint8(out), {"nfe": p["steps"]}  # exactly the steps asked for (ddim.edit.strength_timesteps)

    def inpaint(self, u8: np.ndarray, mask: np.ndarray, p: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Regenerate the upload inside ``mask`` (bool [H, W], True = regenerate), :func:`ddim.edit.inpaint`."""
        m = torch.from_numpy(mask.astype(np.float32))[None, None].to(self.device)
        with torch.inference_mode():
            out = inpaint(
                self.model,
                self.schedule,
                self.to_model(u8),
                m,
                **self._edit_kwargs(p),
            )
        return to_uint8(out), {"nfe": p["steps"]}
