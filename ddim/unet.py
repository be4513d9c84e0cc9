"""A compact U-Net for small images (MNIST-size and up), fast on CPU; also 1-D signals and 3-D video.

Ho et al. (2020)'s architecture, shrunk: sinusoidal time embedding, residual blocks with
GroupNorm and SiLU whose scale/shift come from the time (and class) embedding,
self-attention at the lowest resolution, and optional class conditioning with a learned
null class (index ``num_classes``) for classifier-free guidance (Ho & Salimans 2022).

``UNetConfig(dims=1)`` makes the same network for signals [B, C, L] (audio-like) and ``dims=3`` for
video [B, C, F, H, W] (3-D convolutions; down- and upsampling act on H and W only, so any number of
frames F works; attention runs over all F·H·W positions of the lowest level).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet` (stored in checkpoint configs).

    Attributes:
        image_size: height = width of the images (must be divisible by 2**(len(channel_mults)-1));
            the length L of a 1-D signal (``dims=1``).
        in_channels: image channels (1 for MNIST, 3 for RGB).
        base_channels: channels at full resolution.
        channel_mults: channel multiplier per resolution level; each level but the last halves H, W.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: levels (0 = full resolution) that get self-attention; default the lowest.
        num_classes: classes for conditioning; 0 = unconditional. Index ``num_classes`` is the null class.
        dropout: dropout inside residual blocks.
        num_heads: attention heads.
        dims: 2 (default) images [B, C, H, W]; 1 signals [B, C, L]; 3 video [B, C, F, H, W].
        frames: F, the frames of 3-D samples (``dims=3`` only; any F >= 1, never resampled).
    """

    image_size: int = 28
    in_channels: int = 1
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 3, 6)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] | None = None
    num_classes: int = 0
    dropout: float = 0.1
    num_heads: int = 4
    extra: dict = field(default_factory=dict)
    dims: int = 2
    frames: int = 0

    def __post_init__(self) -> None:
        for name, low in (("image_size", 1), ("in_channels", 1), ("base_channels", 1), ("num_res_blocks", 1)):
            _check_int(name, getattr(self, name), low)
        _check_int("num_classes", self.num_classes, 0)
        _check_int("num_heads", self.num_heads, 1)
        self.channel_mults = _int_tuple("channel_mults", self.channel_mults, 1)
        if not self.channel_mults:
            raise ValueError("channel_mults must name at least one level, e.g. [1, 2, 2]")
        if self.attention_levels is None:
            self.attention_levels = (len(self.channel_mults) - 1,)
        self.attention_levels = _int_tuple("attention_levels", self.attention_levels, 0)
        bad = [a for a in self.attention_levels if a >= len(self.channel_mults)]
        if bad:
            raise ValueError(
                f"attention_levels: level {bad[0]} does not exist (levels 0..{len(self.channel_mults) - 1})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        down = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % down:
            raise ValueError(f"image_size={self.image_size} must be divisible by {down} for channel_mults")
        for level in {*self.attention_levels, len(self.channel_mults) - 1}:  # the middle attends too
            ch = self.base_channels * self.channel_mults[level]
            if ch % self.num_heads:
                raise ValueError(f"num_heads={self.num_heads} must divide the {ch} channels of level {level}")
        if isinstance(self.dims, bool) or self.dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1 (signals), 2 (images) or 3 (video), got {self.dims!r}")
        _check_int("frames", self.frames, 0)
        if (self.dims == 3) != (self.frames >= 1):
            raise ValueError(f"frames must be >= 1 for dims=3 and 0 otherwise, got {self.frames} with dims={self.dims}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (C, L), (C, H, W) or (C, F, H, W) for ``dims`` 1, 2, 3."""
        c, s = self.in_channels, self.image_size
        return {1: (c, s), 2: (c, s, s), 3: (c, self.frames, s, s)}[self.dims]

    @classmethod
    def from_dict(cls, d: object) -> UNetConfig:
        """A config from a dict (a checkpoint's ``"unet"``); ValueError naming an unknown or wrongly typed field."""
        if not isinstance(d, dict):
            raise ValueError(f"the unet config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown unet field(s) {unknown}; valid: {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"unet config: {e}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_levels"] = list(self.attention_levels)
        if self.dims == 2:  # image configs stay as they were written before 1-D/3-D existed
            del d["dims"], d["frames"]
        return d


def _check_int(name: str, v: object, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return v


def _int_tuple(name: str, v: object, low: int) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise ValueError(f"{name} must be a list of ints, got {v!r}")
    return tuple(_check_int(f"{name} entries", m, low) for m in v)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer or real) timesteps: [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _resample(dims: int) -> int | tuple[int, ...]:
    """Stride of downsampling / factor of upsampling: 2 along L, H, W; 1 along the frames of video."""
    return (1, 2, 2) if dims == 3 else 2


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, dims: int = 2) -> None:
        super().__init__()
        conv = _CONV[dims]
        self.norm1 = _norm(cin)
        self.conv1 = conv(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = conv(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)
        scale, shift = e.reshape(*e.shape, *([1] * (x.ndim - 2))).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Self-attention over every position (H·W, L or F·H·W) of a feature map."""

    def __init__(self, ch: int, heads: int, dims: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = _norm(ch)
        self.qkv = _CONV[dims](ch, 3 * ch, 1)
        self.out = _CONV[dims](ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(a.transpose(-1, -2).reshape(x.shape))


def _check_labels(y: torch.Tensor, k: int) -> None:
    """Class labels must be 0..k-1, or k (the null class): ValueError naming ``y`` otherwise."""
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi > k:
        bad = lo if lo < 0 else hi
        raise ValueError(f"y: class label {bad} is out of range: 0..{k - 1}, or {k} for the null class")


class UNet(nn.Module):
    """ε/x₀/v-prediction U-Net: ``forward(x [B,C,H,W] float, t [B] int64, y [B] int64 | None) -> [B,C,H,W]``
    (x [B, C, L] with ``dims=1``, [B, C, F, H, W] with ``dims=3``; the output is shaped like x).

    ``y`` is the class label in [0, num_classes]; ``num_classes`` (or ``y=None``) is the null
    class, i.e. unconditional. With ``num_classes == 0`` the model ignores ``y``.
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = cfg = config or UNetConfig(**kwargs)
        ch = cfg.base_channels
        emb_dim = 4 * ch
        d = cfg.dims
        conv = _CONV[d]
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None
        self.conv_in = conv(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        n_levels = len(cfg.channel_mults)
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                blocks = nn.ModuleList([ResBlock(cur, ch * mult, emb_dim, cfg.dropout, d)])
                cur = ch * mult
                if level in cfg.attention_levels:
                    blocks.append(Attention(cur, cfg.num_heads, d))
                self.down.append(blocks)
                skips.append(cur)
            if level < n_levels - 1:
                self.down.append(nn.ModuleList([conv(cur, cur, 3, stride=_resample(d), padding=1)]))
                skips.append(cur)

        self.mid1 = ResBlock(cur, cur, emb_dim, cfg.dropout, d)
        self.mid_attn = Attention(cur, cfg.num_heads, d)
        self.mid2 = ResBlock(cur, cur, emb_dim, cfg.dropout, d)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, emb_dim, cfg.dropout, d)])
                cur = ch * mult
                if level in cfg.attention_levels:
                    blocks.append(Attention(cur, cfg.num_heads, d))
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=_resample(d), mode="nearest"))
                    blocks.append(conv(cur, cur, 3, padding=1))
                self.up.append(blocks)

        self.norm_out = _norm(cur)
        self.conv_out = conv(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 2 + self.config.dims or x.shape[1] != self.config.in_channels:
            shape = ", ".join(map(str, self.config.sample_shape))
            raise ValueError(f"x must be [B, {shape}] for this model, got {tuple(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.config.num_classes, dtype=torch.long, device=x.device)
            elif y.device.type == "cpu":  # (on an accelerator a check would wait for the device every call)
                _check_labels(y, self.config.num_classes)
            emb = emb + self.class_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            for m in blocks:
                h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for m in blocks:
                h = m(h, emb) if isinstance(m, ResBlock) else m(h)
        return self.conv_out(F.silu(self.norm_out(h)))
