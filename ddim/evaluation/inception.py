"""The Inception-V3 of FID, built here so that the standard weights file loads without torchvision.

The layout (module names, channel counts, the FID variants of the A/C/E blocks) is that of
pytorch-fid's ``fid_inception_v3``, so ``pt_inception-2015-12-05-6726825d.pth`` (the TensorFlow
FID Inception ported to PyTorch) loads with its own key names. Nothing is downloaded: the user
supplies the file (see :data:`WEIGHTS_FILE`, :func:`default_weights_path`).

Differences from the ImageNet torchvision Inception-V3, all from the TensorFlow graph FID was defined
with: 1008 output classes; average pools in blocks A, C and E_1 leave the zero padding out of the
average; the second E block (Mixed_7c) max-pools its pool branch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FIDInceptionV3",
    "WEIGHTS_FILE",
    "WEIGHTS_URL",
    "default_weights_path",
    "load_fid_inception",
    "missing_weights_message",
]

#: The weights file FID scores in papers are computed with (pytorch-fid's port of TF's 2015-12-05 Inception).
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
FEATURE_DIM = 2048
INPUT_SIZE = 299


def default_weights_path() -> Path:
    """Where the weights are looked for when no path is given: ``$DDIM_INCEPTION_WEIGHTS``, else
    ``~/.cache/ddim/pt_inception-2015-12-05-6726825d.pth``."""
    env = os.environ.get("DDIM_INCEPTION_WEIGHTS")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddim" / WEIGHTS_FILE


def missing_weights_message(path: str | os.PathLike) -> str:
    """What to tell a user whose Inception weights file is missing (one line)."""
    return (
        f"Inception-V3 FID weights not found at {path}: this needs the file {WEIGHTS_FILE} "
        f"(pytorch-fid's port of the TF FID Inception, 91 MB; fetch it once from {WEIGHTS_URL}) "
        f"saved at {default_weights_path()} or passed with --inception-weights PATH; nothing is downloaded at run time"
    )


class _Conv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU; the key names ``conv``/``bn`` are the weights file's."""

    def __init__(self, cin: int, cout: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool leaves the zero padding out of the average.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, kernel_size=1)
        self.branch5x5_1 = _Conv(cin, 48, kernel_size=1)
        self.branch5x5_2 = _Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class _BlockB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class _BlockD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch3x3_2 = _Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = _Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        # The FID graph max-pools in its last block (Mixed_7c), where other Inceptions average.
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """FID's Inception-V3: images [B, 3, H, W] in [0, 1] -> pool features [B, 2048].

    Inputs are resized bilinearly to 299×299 (as pytorch-fid does) and mapped to [-1, 1].
    ``fc`` (1008 logits) is kept only so that the weights file loads whole; it is not used.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, kernel_size=3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, c7=128)
        self.Mixed_6c = _BlockC(768, c7=160)
        self.Mixed_6d = _BlockC(768, c7=160)
        self.Mixed_6e = _BlockC(768, c7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, 1008)
        self.num_features = FEATURE_DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 takes [B, 3, H, W] images, got {tuple(x.shape)}")
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def load_fid_inception(path: str | os.PathLike | None = None) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the weights in ``path`` (a ``.pth`` state dict as pytorch-fid
    publishes it, or a ``.safetensors`` file with the same keys), in eval mode.

    Raises:
        FileNotFoundError: no file at ``path`` (the message names the file needed and where it goes).
        ValueError: the file is not a state dict of this architecture (names the first mismatches).
    """
    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(missing_weights_message(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise ValueError(f"Inception weights {path} cannot be read as a state dict: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"Inception weights {path} hold a {type(state).__name__}, not a state dict")
    model = FIDInceptionV3()
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"Inception weights {path} do not fit FID's Inception-V3: {str(e).splitlines()[-1]}") from e
    # Old files (as the published one) predate BatchNorm's num_batches_tracked counter: not needed.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Inception weights {path} do not fit FID's Inception-V3: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
    return model.eval()
