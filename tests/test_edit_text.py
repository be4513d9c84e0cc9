"""`ddim.edit.prompt_edit` on a tiny random Stable Diffusion folder: latent-space edits by prompt."""

from __future__ import annotations

import pytest
import torch

import ddim

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from ddim.tiny_sd import tiny_stable_diffusion

    pipe = tiny_stable_diffusion(prediction="v_prediction", scheduler="DDIMScheduler", layout="sd2",
                                 scheduler_config={"timestep_spacing": "trailing"})  # fmt: skip
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    pipe.save_pretrained(folder)
    return (*ddim.load(folder), str(folder))


def test_prompt_edit_inverts_exactly_and_edits_by_prompt(sd):
    from ddim.edit import prompt_edit

    model, schedule, config, _ = sd
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # a random network is stiff (its fixed-point iteration converges slowly): 30 steps, 10 calls a step
    same = prompt_edit(model, schedule, config, images, "a red cat", "a red cat", steps=30, max_iter=10)
    plain = prompt_edit(model, schedule, config, images, "a red cat", "a red cat", steps=30, method="ddim")
    err = (same["edited"] - same["encoded"]).abs().max()  # measured 0.057 against plain 0.35
    assert err < (plain["edited"] - plain["encoded"]).abs().max() / 4, err
    assert same["images"].shape == images.shape
    other = prompt_edit(model, schedule, config, images, "a red cat", "the dog", steps=30, guidance=3.0, max_iter=10)
    assert torch.equal(other["latents"], same["latents"])  # the same inversion, another regeneration
    assert not torch.allclose(other["edited"], same["edited"])


def test_edit_command_on_a_text_model(sd, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from ddim.cli import run

    folder = sd[3]
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "im.png")
    args = ["edit", str(tmp_path / "im.png"), "--model", folder, "--steps", "3", "--out", str(tmp_path / "o.png")]
    assert run([*args, "--prompt", "the dog", "--source-prompt", "a cat", "--guidance", "2"]) == 0
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (32, 32, 3)  # the input's size (model: 16×16)
    assert run([*args, "--to-class", "1"]) == 2 and "--prompt" in capsys.readouterr().err
    assert run([*args, "--prompt", "x", "--strength", "0.5"]) == 2 and "--prompt edits only" in capsys.readouterr().err
