"""Networks: a causal conditional denoiser over log-mel frames and a causal Vocos-style vocoder.

Both are 1-D convolutional over time with *causal* depthwise convolutions whose left context is
carried between calls in a cache (moshi-style streaming state), so a stream computes each frame
exactly once and chunked == whole-signal. Look-ahead is not built into the layers: the engine
feeds the conditioning `lookahead` frames early, so the latency is a parameter, not an accident
of padding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rtsr.features import N_BINS, N_MELS

Cache = dict[str, torch.Tensor]


class CausalDWConv(nn.Module):
    """Depthwise causal conv; with a cache the last (k-1)*d input frames persist between calls."""

    def __init__(self, channels: int, kernel: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, dilation=dilation, groups=channels)
        self.context = (kernel - 1) * dilation
        self.key = ""  # set by the owning network so each layer has its own cache slot

    def forward(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        if cache is None:
            x = nn.functional.pad(x, (self.context, 0))
        else:
            past = cache.get(self.key)
            if past is None:
                past = x.new_zeros(x.shape[0], x.shape[1], self.context)
            x = torch.cat([past, x], dim=-1)
            cache[self.key] = x[..., x.shape[-1] - self.context:]
        return self.conv(x)


class ChannelNorm(nn.Module):
    """LayerNorm over channels of a (B, C, T) tensor: per frame, so it streams."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class ConvNeXtBlock(nn.Module):
    """dwconv -> norm -> pointwise MLP, optionally FiLM-modulated by a per-sequence embedding."""

    def __init__(self, channels: int, kernel: int, dilation: int, mult: int = 3, emb_dim: int = 0):
        super().__init__()
        self.dw = CausalDWConv(channels, kernel, dilation)
        self.norm = ChannelNorm(channels)
        self.pw1 = nn.Conv1d(channels, channels * mult, 1)
        self.pw2 = nn.Conv1d(channels * mult, channels, 1)
        self.scale = nn.Parameter(torch.full((channels, 1), 0.1))
        self.film = nn.Linear(emb_dim, 2 * channels) if emb_dim else None

    def forward(self, x: torch.Tensor, cache: Cache | None, emb: torch.Tensor | None = None):
        # pointwise layers as matrix products on (B, T, C): for the few frames of a live hop this
        # is ~3x faster on a CPU than 1x1 convolutions, and the same function
        h = self.norm.norm(self.dw(x, cache).transpose(1, 2))
        if self.film is not None:
            gain, shift = self.film(emb).unsqueeze(1).chunk(2, dim=-1)
            h = h * (1 + gain) + shift
        h = nn.functional.gelu(nn.functional.linear(h, self.pw1.weight[..., 0], self.pw1.bias))
        h = nn.functional.linear(h, self.pw2.weight[..., 0], self.pw2.bias)
        return x + self.scale * h.transpose(1, 2)


def _name_caches(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if isinstance(sub, CausalDWConv):
            sub.key = name


def init_cache(module: nn.Module, batch: int, device: str | torch.device = "cpu") -> Cache:
    """Zero state for every causal conv: explicit, so caches of several streams can be stacked."""
    return {m.key: torch.zeros(batch, m.conv.in_channels, m.context, device=device)
            for m in module.modules() if isinstance(m, CausalDWConv)}


def receptive_field(module: nn.Module) -> int:
    """Past frames that influence one output frame (the carried state's reach)."""
    return sum(m.context for m in module.modules() if isinstance(m, CausalDWConv))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    ang = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class Denoiser(nn.Module):
    """v-prediction denoiser of the high-resolution log-mel given the low-resolution one.

    Inputs per frame: the noisy HR mel, the LR mel (`lookahead` frames ahead, arranged by the
    caller), and the mask of mel bands below the cutoff. The same class with `x` zeroed and t=0
    serves as the one-step regression baseline.
    """

    def __init__(self, channels: int = 160, blocks: int = 8, kernel: int = 5,
                 dilations: tuple[int, ...] = (1, 2, 4, 8), emb_dim: int = 128):
        super().__init__()
        self.config = dict(channels=channels, blocks=blocks, kernel=kernel,
                           dilations=list(dilations), emb_dim=emb_dim)
        self.emb_dim = emb_dim
        self.inp = nn.Conv1d(3 * N_MELS, channels, 1)
        self.emb = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(channels, kernel, dilations[i % len(dilations)], emb_dim=emb_dim)
            for i in range(blocks))
        self.out_norm = ChannelNorm(channels)
        self.out = nn.Conv1d(channels, N_MELS, 1)
        _name_caches(self)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        """x, cond: (B, N_MELS, T); mask: (B, N_MELS) or per frame (B, N_MELS, T); t: (B,) in
        [0, 1] -> v (B, N_MELS, T)."""
        m = mask if mask.dim() == 3 else mask[:, :, None].expand(-1, -1, x.shape[-1])
        h = self.inp(torch.cat([x, cond, m], dim=1))
        emb = self.emb(timestep_embedding(t, self.emb_dim))
        for block in self.blocks:
            h = block(h, cache, emb)
        return self.out(self.out_norm(h))


class Vocoder(nn.Module):
    """Log-mel -> complex STFT frames (Vocos head: log-magnitude and phase per bin).

    The inverse FFT stays outside the network so a compiled engine never needs complex ops.
    """

    def __init__(self, channels: int = 256, blocks: int = 6, kernel: int = 7, mult: int = 3):
        super().__init__()
        self.config = dict(channels=channels, blocks=blocks, kernel=kernel, mult=mult)
        self.inp = nn.Conv1d(N_MELS, channels, 1)
        self.blocks = nn.ModuleList(ConvNeXtBlock(channels, kernel, 1, mult) for _ in range(blocks))
        self.out_norm = ChannelNorm(channels)
        self.head = nn.Conv1d(channels, 2 * N_BINS, 1)
        _name_caches(self)

    def forward(self, mel: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """mel: (B, N_MELS, T) -> (B, 2, N_BINS, T): log-magnitude, phase."""
        h = self.inp(mel)
        for block in self.blocks:
            h = block(h, cache)
        out = self.head(self.out_norm(h))
        return out.view(out.shape[0], 2, N_BINS, out.shape[-1])


def to_complex(head_out: torch.Tensor) -> torch.Tensor:
    """(B, 2, N_BINS, T) -> complex (B, T, N_BINS); magnitude capped to keep exp() finite."""
    logmag, phase = head_out[:, 0], head_out[:, 1]
    mag = torch.exp(logmag.clamp(max=12.0))
    return torch.polar(mag, phase).transpose(1, 2)
