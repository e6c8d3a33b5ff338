"""Numba kernels against plain references; the networks' bounded receptive field."""

import numpy as np
import torch

from rtsr.kernels.noise import frame_noise
from rtsr.kernels.ola import overlap_add, overlap_add_ref
from rtsr.models.nets import Denoiser, receptive_field


def test_overlap_add_matches_reference():
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((3, 5, 480)).astype(np.float32)
    window = rng.random(480).astype(np.float32)
    a = rng.standard_normal((3, 2000)).astype(np.float32)
    b = a.copy()
    overlap_add(frames, window, a, 17, 240)
    overlap_add_ref(frames, window, b, 17, 240)
    assert np.allclose(a, b, atol=1e-6)


def test_noise_depends_only_on_its_coordinates():
    whole = frame_noise(5, 10, 50, 80, 2)
    parts = np.concatenate([frame_noise(5, 10, 7, 80, 2), frame_noise(5, 17, 43, 80, 2)], axis=-1)
    assert np.array_equal(whole, parts)
    assert np.array_equal(frame_noise(5, 10, 5, 80, 1, channel0=1)[0], whole[1, :, :5])
    assert abs(whole.mean()) < 0.05 and abs(whole.std() - 1) < 0.05
    assert not np.array_equal(frame_noise(6, 10, 5, 80, 1), whole[:1, :, :5])


def test_denoiser_receptive_field_is_what_it_says():
    torch.manual_seed(0)
    net = Denoiser(16, 3, kernel=3, dilations=(1, 2, 4), emb_dim=16).eval()
    rf = receptive_field(net)
    assert rf == 2 * (1 + 2 + 4)
    x, cond = torch.randn(1, 80, 40), torch.randn(1, 80, 40)
    mask, t = torch.ones(1, 80), torch.rand(1)
    base = net(x, cond, mask, t)
    far, near = x.clone(), x.clone()
    far[..., 39 - rf - 1] += 10.0  # just outside frame 39's past context
    near[..., 39 - rf] += 10.0  # the oldest frame inside it
    assert torch.equal(net(far, cond, mask, t)[..., 39], base[..., 39])
    assert not torch.allclose(net(near, cond, mask, t)[..., 39], base[..., 39])
    future = x.clone()
    future[..., 39] += 10.0  # causal: frame 38 never sees frame 39
    assert torch.equal(net(future, cond, mask, t)[..., 38], base[..., 38])
