"""Numba kernels against plain references; the networks' bounded receptive field."""

import numpy as np
import torch

from rtsr.engine import merge_low_band
from rtsr.features import N_BINS, log_mel
from rtsr.hopbank import LEVEL_FLAT, LEVEL_FRAMES, LEVEL_SPAN, LEVEL_TAPER, MAX_LEVEL_GAIN, HopBank
from rtsr.kernels.edges import first_quiet
from rtsr.kernels.hops import hop_inputs, merged_spectra, overlap_add_hop
from rtsr.kernels.intake import all_finite
from rtsr.kernels.mel import log_mel_frames
from rtsr.kernels.noise import frame_noise
from rtsr.kernels.spectrum import count_loud, windowed
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
    q_spec, q_mel, q_band = (np.arange(10, dtype=t)[None] for t in (np.complex64, np.float32, np.int32))
    q_spec, q_mel, queued = q_spec[:, :, None].repeat(3, 2), q_mel[:, None].copy(), np.array([10])  # 3 bins, 1 mel
    rows = np.array([0])
    out = []
    for h in range(2):
        y, made = overlap_add_hop(rows, frames[h:h + 1], window, hop, np.array([hop if h == 0 else 0]),
                                  np.array([10 ** 9]), tail, q_spec, q_mel, q_band, queued)
        out.append(y[0, :made[0]])
    np.testing.assert_array_equal(np.concatenate(out), whole[hop:2 * n * hop])
    assert queued[0] == 4 and (q_spec[0, 0] == 6).all() and q_mel[0, 0, 0] == 6 and q_band[0, 3] == 9


def test_the_merge_kernel_is_merge_low_bands_arithmetic():
    """Rows gathered from a queue, each frame its band's weights: the plain merge, to its last bit
    or so (the compiled loop may fuse a multiply and an add)."""
    rng = np.random.default_rng(0)
    q_spec = (rng.standard_normal((5, 7, N_BINS)) + 1j * rng.standard_normal((5, 7, N_BINS))).astype(np.complex64)
    gen = (rng.standard_normal((3, 4, N_BINS)) + 1j * rng.standard_normal((3, 4, N_BINS))).astype(np.complex64)
    weights, rows, band = rng.random((3, N_BINS)).astype(np.float32), np.array([4, 0, 2]), rng.integers(0, 3, (3, 4))
    plain = merge_low_band(q_spec[rows, :4], gen, weights[band])
    merged = merged_spectra(rows, q_spec, band, weights, gen)
    assert np.abs(merged - plain).max() <= 4e-7 * np.abs(plain).max() and not np.array_equal(merged, 0 * plain)


def test_the_engines_log_mel_is_the_features_definition():
    """Frames from silence to full scale and beyond, and digital silence (the floor): the engine's
    compiled log-mel against `features.log_mel` (what training computes), to float32 rounding."""
    rng = np.random.default_rng(0)
    level = 10.0 ** rng.uniform(-7, 2, (64, 1))
    spec = ((rng.standard_normal((64, N_BINS)) + 1j * rng.standard_normal((64, N_BINS))) * level).astype(np.complex64)
    spec[3] = 0
    spec[5, ::2] = 0
    ref = log_mel(torch.from_numpy(spec)).numpy()
    got = log_mel_frames(spec)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 2e-6 and ref.max() > 1
    assert (got[3] == ref[3]).all() and (ref[3] == ref.min()).all()  # the floor


class Owner:
    """A stream's stand-in: a bank's row is given back when its owner is gone."""


def level_bank(frames: int, under: float, model: float) -> tuple[HopBank, int, np.ndarray]:
    """One row queued with `frames` frames whose input has amplitude `under` under a lossy 8 kHz
    edge (none above), and a model spectrum of amplitude `model` everywhere."""
    bank = HopBank(1)
    bank.owner = Owner()
    row = bank.join_for(bank.owner)
    b = bank.band_id((8000.0, 8000.0, 8300.0))  # a lossy edge band (rtsr.cutoff.Band.merge_range)
    e = int(bank.edge_bin[b])
    bank.enqueue(np.array([row]), np.array([frames]), np.array([0]), np.array([b], np.int32),
                 np.where(np.arange(N_BINS) < e, under, 0).astype(np.complex64)[None].repeat(frames, 0),
                 np.zeros((frames, 80), np.float32))
    return bank, e, np.full((1, frames, N_BINS), model, np.complex64)


def test_a_lossy_rows_model_band_is_raised_to_the_inputs_level_at_its_edge():
    bank, e, gen = level_bank(8, under=1.0, model=0.1)
    rows, lossy, band = np.array([0]), np.array([True]), bank.band[:1, :8]
    powers = bank.match_levels(rows, lossy, band, gen)
    assert np.allclose(powers[0, :, 0], LEVEL_SPAN) and np.allclose(powers[0, :, 1], 0.01 * LEVEL_SPAN)
    assert np.allclose(gen[0, :, :e], 0.1)  # under the edge: untouched (the input is kept there)
    assert np.allclose(gen[0, :, e], 1.0, rtol=1e-5)  # at the edge: the input's level (x 10)
    assert np.allclose(gen[0, :, e + LEVEL_FLAT], 1.0, rtol=1e-5)  # the first kHz: all of it
    assert np.allclose(gen[0, :, e + LEVEL_FLAT + LEVEL_TAPER // 2], 0.1 * 10 ** 0.5, rtol=1e-5)  # half, in dB
    assert np.allclose(gen[0, :, e + LEVEL_FLAT + LEVEL_TAPER:], 0.1)
    bank.remember_levels(rows, lossy, powers)
    assert bank.level_count[0] == 8
    # a model band already louder is never lowered; nor is a row that is not lossy; the gain is capped
    for under, model, lossy, at_edge in ((0.1, 1.0, True, 1.0), (1.0, 0.1, False, 0.1),
                                         (1.0, 1e-4, True, 1e-4 * MAX_LEVEL_GAIN)):
        bank, e, gen = level_bank(8, under, model)
        bank.match_levels(rows, np.array([lossy]), bank.band[:1, :8], gen)
        assert np.allclose(gen[0, :, e], at_edge, rtol=1e-5)


def test_a_frames_level_gain_is_the_same_for_any_hop_lengths():
    """The gain sums each frame's LEVEL_FRAMES last powers, oldest first: split into hops, a frame
    gets the bits it gets in one long hop."""
    n = 2 * LEVEL_FRAMES + 7
    rng = np.random.default_rng(0)
    gens = 0.01 * (rng.standard_normal((1, n, N_BINS)) + 1j * rng.standard_normal((1, n, N_BINS)))
    gens = gens.astype(np.complex64)
    whole, _, _ = level_bank(n, 1.0, 0.0)
    whole.spec[0, :n] *= rng.uniform(0.1, 2.0, (n, 1)).astype(np.float32)
    one = gens.copy()
    whole.match_levels(np.array([0]), np.array([True]), whole.band[:1, :n], one)
    parts, _, _ = level_bank(n, 1.0, 0.0)
    parts.spec[:] = whole.spec
    at = 0
    for k in (1, 5, LEVEL_FRAMES, 30, n - LEVEL_FRAMES - 36):
        g = gens[:, at:at + k].copy()
        p = parts.match_levels(np.array([0]), np.array([True]), parts.band[:1, :k], g)
        parts.spec[0, :n - k] = parts.spec[0, k:n].copy()  # the hop's frames leave the queue
        parts.band[0, :n - k] = parts.band[0, k:n].copy()
        parts.remember_levels(np.array([0]), np.array([True]), p)
        assert np.array_equal(g, one[:, at:at + k]), at
        at += k
    assert at == n


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


def test_a_hops_model_inputs_are_numpys_gather():
    """Conditioning (lookahead frames on), the hop's own log-mel and bands, rows in any order."""
    rng = np.random.default_rng(1)
    q_mel = rng.standard_normal((9, 80, 12)).astype(np.float32)
    q_band = rng.integers(0, 7, (9, 12)).astype(np.int32)
    rows = np.array([7, 2, 5, 0])
    cond, low, band = hop_inputs(rows, q_mel, q_band, 2, 4)
    np.testing.assert_array_equal(cond, q_mel[rows, :, 2:6])
    np.testing.assert_array_equal(low, q_mel[rows, :, :4])
    np.testing.assert_array_equal(band, q_band[rows, :4])


def test_the_compiled_finite_check_is_numpys():
    """NaN or Inf anywhere, in any channel and layout (a transposed or sliced block), is found."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    assert all_finite(x) and all_finite(x[:, 1:2]) and all_finite(np.asfortranarray(x))
    for bad in (np.nan, np.inf, -np.inf):
        for i, c in ((0, 0), (49, 2), (17, 1)):
            y = x.copy()
            y[i, c] = bad
            others = [k for k in range(3) if k != c]
            assert not all_finite(y) and not all_finite(np.asfortranarray(y)) and all_finite(y[:, others])


def test_the_edge_scan_is_the_first_hit_of_the_whole_matrix():
    """first_quiet against every candidate judged at once (numpy matrices, as the edge search
    judged them before): the same first hit on random spectra with and without a fall."""
    rng = np.random.default_rng(0)
    for case in range(300):
        top = int(rng.integers(60, 480))
        level = rng.normal(0, rng.uniform(1, 8), 480) - rng.uniform(20, 90) * (np.arange(480) > rng.integers(0, 480))
        cand = np.arange(12, max(13, top - 25))
        quiet_from = cand + rng.integers(0, 30)
        steep_at = np.where(rng.random(len(cand)) < 0.5, np.minimum(cand + 12, top - 1), -1)
        below = np.median(np.lib.stride_tricks.sliding_window_view(level, 12)[cand - 12], axis=1)
        quiet = np.minimum(below - 30.0, level.max() - 50.0)
        cols = np.arange(top)[None, :] - quiet_from[:, None]
        loud = (level[None, :top] > quiet[:, None]) & (cols >= 0)
        near = loud & (cols < 20)
        steep = (steep_at < 0) | (below - level[steep_at] >= 20.0)
        quiet_enough = (loud.sum(1) / np.maximum(top - quiet_from, 1) <= 0.2) & (near.sum(1) <= 0.2 * 20)
        hits = np.flatnonzero(quiet_enough & steep)
        got = first_quiet(level, top, cand, 12, 30.0, level.max() - 50.0, steep_at, 20.0, quiet_from, 20, 0.2)
        assert got == (hits[0] if len(hits) else -1), case


def test_the_detectors_frames_are_numpys_to_the_bit():
    """Windowed frames, each frame's power, which frames count (over the threshold: also one set
    exactly at a frame's mean, which does not count) and their float64 sums, as numpy makes them."""
    import scipy.fft

    from rtsr.cutoff import _window

    rng = np.random.default_rng(3)
    for case in range(60):
        channels, n = int(rng.integers(1, 4)), int(rng.integers(1, 6))
        buf = (rng.standard_normal((4096 + (n - 1) * 2048 + 7, channels)) * 10 ** rng.uniform(-5, 0)).astype(np.float32)
        frames = windowed(buf, n, 2048, _window(), np.empty((n, channels, 4096), np.float32))
        assert np.array_equal(frames, np.stack([buf[k * 2048:k * 2048 + 4096].T for k in range(n)]) * _window())
        spec = scipy.fft.rfft(frames, axis=2)
        power = (spec.real ** 2 + spec.imag ** 2).sum(axis=1)
        means = power.mean(axis=1)
        threshold = means[case % n] if case % 3 == 0 else np.float32(np.median(means) * rng.uniform(0.5, 2))
        loud = means > threshold
        want, got = np.zeros(power.shape[1]), np.zeros(power.shape[1])
        for p in power[loud]:
            want += p
        assert count_loud(spec, np.float32(threshold), got) == loud.sum()
        assert np.array_equal(got, want)
