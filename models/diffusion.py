"""v-prediction diffusion on a cosine schedule, a DDIM sampler that streams, and the targets of
progressive distillation (Salimans & Ho 2022), which halves the sampler's steps per phase."""

from __future__ import annotations

import math
from functools import cache

import torch

from rtsr.models.nets import Cache, Denoiser


def alpha_sigma(t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.view(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def noisy(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(t)
    return _bcast(a, x0) * x0 + _bcast(s, x0) * eps


def v_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(t)
    return _bcast(a, x0) * eps - _bcast(s, x0) * x0


def step_times(steps: int) -> list[float]:
    """Uniform grid from pure noise (t=1) to data (t=0)."""
    return [1.0 - k / steps for k in range(steps + 1)]


def ddim_update(z: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float,
                t_next: torch.Tensor | float) -> torch.Tensor:
    """One deterministic DDIM step; times are Python floats (the sampler's: its coefficients are
    floats too, so no constant is copied to the device) or tensors, one per batch item."""
    if isinstance(t, float) and isinstance(t_next, float):
        a, s = _alpha_sigma_float(t)
        an, sn = _alpha_sigma_float(t_next)
    else:
        a, s = (_bcast(u, z) for u in alpha_sigma(t))
        an, sn = (_bcast(u, z) for u in alpha_sigma(t_next))
    v = v.to(z.dtype)
    x0 = a * z - s * v
    eps = s * z + a * v
    return an * x0 + sn * eps


@cache
def _alpha_sigma_float(t: float) -> tuple[float, float]:
    """`alpha_sigma` as Python floats, computed once per time on the CPU exactly as the tensor
    version does (float32), so the float sampler's steps equal the tensor one's bit for bit."""
    a, s = alpha_sigma(t)
    return float(a), float(s)


def guided_v(net: Denoiser, z: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor,
             t: torch.Tensor | float, guidance: float, cache: Cache | None = None,
             lossy: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance: the unconditional branch sees zeroed conditioning and mask. A
    float t (the sampler's) takes the network's remembered FiLM for that time, so the call
    copies nothing to the device and reads nothing back. lossy: the codec flag per item (a
    network trained with it; both branches are told)."""
    if isinstance(t, float):
        tt, film = None, net.step_film(t)
    else:
        tt, film = torch.as_tensor(t, dtype=torch.float32, device=z.device).expand(z.shape[0]), None
    if guidance == 1.0:
        return net(z, cond, mask, tt, cache, lossy=lossy, film=film)
    both = net(torch.cat([z, z]), torch.cat([cond, torch.zeros_like(cond)]),
               torch.cat([mask, torch.zeros_like(mask)]), None if tt is None else torch.cat([tt, tt]), cache,
               lossy=None if lossy is None else torch.cat([lossy, lossy]), film=film)
    v_c, v_u = both.chunk(2)
    return v_u + guidance * (v_c - v_u)


def sample(net: Denoiser, noise: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor, steps: int,
           guidance: float = 1.0, caches: list[Cache] | None = None,
           lossy: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM from noise to a clean mel. With `caches` (one per step) it runs chunk by chunk. Times
    are Python floats throughout: nothing in a step waits on the device."""
    z = noise
    times = step_times(steps)
    for k in range(steps):
        v = guided_v(net, z, cond, mask, times[k], guidance, caches[k] if caches else None, lossy)
        z = ddim_update(z, v, times[k], times[k + 1])
    return z


def prepare(net: Denoiser, steps: int) -> None:
    """Make now (at load) what a sampler of `steps` steps computes once, each step's FiLM and
    DDIM coefficients (the regression's FiLM at t=0 for `steps` = 0), so no hop computes them,
    the first one included (a hop captured as a CUDA graph must not)."""
    if not steps:
        net.step_film(0.0)
        return
    times = step_times(steps)
    for t in times:
        _alpha_sigma_float(t)
    for t in times[:-1]:
        net.step_film(t)


def distill_target(z: torch.Tensor, z_next2: torch.Tensor, t: torch.Tensor,
                   t_next2: torch.Tensor) -> torch.Tensor:
    """v that takes a student from z_t to the teacher's z after two of its steps, in one step."""
    a, s = (_bcast(u, z) for u in alpha_sigma(t))
    a2, s2 = (_bcast(u, z) for u in alpha_sigma(t_next2))
    ratio = s2 / s.clamp_min(1e-8)
    x0 = (z_next2 - ratio * z) / (a2 - ratio * a).clamp_min(1e-6)
    eps = (z - a * x0) / s.clamp_min(1e-8)
    return a * eps - s * x0
