"""Numba kernels against plain references; the networks' bounded receptive field."""

import numpy as np
import torch

from rtsr.kernels.hops import overlap_add_hop
from rtsr.kernels.noise import frame_noise
from rtsr.models.nets import Denoiser, receptive_field


def test_a_hop_overlap_adds_onto_its_tail_and_leaves_its_queue():
    """Two hops of a row, against plain overlap-add of all the frames: the first HOP samples of a
    stream come before its first sample (not output), a hop's n HOP samples are final, the queue
    loses the hop's frames."""
    rng = np.random.default_rng(0)
    hop, n = 240, 3
    frames = rng.standard_normal((2, n, 2 * hop)).astype(np.float32)
    window = rng.random(2 * hop).astype(np.float32)
    whole = np.zeros((2 * n + 1) * hop, np.float32)
    for k, f in enumerate(frames.reshape(2 * n, 2 * hop)):
        whole[k * hop:k * hop + 2 * hop] += f * window
    tail = np.zeros((1, hop), np.float32)
    q_spec, q_mel, q_band = (np.arange(10, dtype=t)[None].repeat(1, 0) for t in (np.complex64, np.float32, np.int32))
    q_mel, queued = q_mel[:, None].copy(), np.array([10])
    rows = np.array([0])
    out = []
    for h in range(2):
        y, made = overlap_add_hop(rows, frames[h:h + 1], window, hop, np.array([hop if h == 0 else 0]),
                                  np.array([10 ** 9]), tail, q_spec, q_mel, q_band, queued)
        out.append(y[0, :made[0]])
    np.testing.assert_array_equal(np.concatenate(out), whole[hop:2 * n * hop])
    assert queued[0] == 4 and q_spec[0, 0] == 6 and q_mel[0, 0, 0] == 6 and q_band[0, 3] == 9


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
