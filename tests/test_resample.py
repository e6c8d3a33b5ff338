"""Streaming resampler: chunked == whole, exact lengths, zero lag, flat passband, kernel == reference."""

import numpy as np
import pytest
from scipy.signal import resample_poly

from rtsr.kernels.polyphase import polyphase_bank, polyphase_resample, polyphase_resample_ref
from rtsr.resample import StreamingResampler, design_filter, rate_filter, resample

RATES = [(44100, 48000), (96000, 48000), (16000, 48000), (8000, 48000), (48000, 22050), (48000, 48000)]


def _stream(r: StreamingResampler, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Feed x in random blocks, including empty and one-sample ones, then flush."""
    out, i = [], 0
    while i < len(x):
        b = int(rng.choice([0, 1, 2, int(rng.integers(3, 900))]))
        out.append(r.process(x[i : i + b]))
        i += b
    return np.concatenate(out + [r.flush()])


def _tone_fit(y: np.ndarray, f: float, sr: int) -> tuple[float, float]:
    """Least-squares amplitude and phase of a sine at f, so gain and lag are read off a real signal."""
    t = np.arange(len(y)) / sr
    basis = np.stack([np.sin(2 * np.pi * f * t), np.cos(2 * np.pi * f * t)], axis=1)
    (s, c), *_ = np.linalg.lstsq(basis, y.astype(np.float64), rcond=None)
    return float(np.hypot(s, c)), float(np.arctan2(c, s))


@pytest.mark.parametrize("sr_in,sr_out", RATES)
def test_chunked_equals_whole(sr_in: int, sr_out: int) -> None:
    rng = np.random.default_rng(sr_in + sr_out)
    x = rng.standard_normal((sr_in // 4, 2)).astype(np.float32)
    whole = resample(x, sr_in, sr_out)
    chunked = _stream(StreamingResampler(sr_in, sr_out, channels=2), x, rng)
    assert chunked.shape == whole.shape == (round(len(x) * sr_out / sr_in), 2)
    np.testing.assert_array_equal(chunked, whole)  # same kernel, same taps, same order: bit-exact


@pytest.mark.parametrize("sr_in,sr_out", RATES + [(192000, 8000), (11025, 48000), (22050, 24000)])
def test_exact_output_length(sr_in: int, sr_out: int) -> None:
    rng = np.random.default_rng(0)
    for n in [0, 1, 2, 3, 5, 7, 146, 147, 441, 1001, 4411]:
        assert len(resample(np.ones(n, np.float32), sr_in, sr_out)) == round(n * sr_out / sr_in)
        r = StreamingResampler(sr_in, sr_out)
        assert len(_stream(r, np.ones((n, 1), np.float32), rng)) == round(n * sr_out / sr_in)


@pytest.mark.parametrize("sr_in,sr_out", [(16000, 48000), (44100, 48000), (96000, 48000)])
def test_emits_as_soon_as_exact(sr_in: int, sr_out: int) -> None:
    """After n inputs, every output older than lookahead_in inputs (delay_out outputs) is out, no more."""
    r = StreamingResampler(sr_in, sr_out)
    emitted = 0
    for n in range(37, 3000, 37):
        emitted += len(r.process(np.zeros((37, 1), np.float32)))
        now = n * sr_out / sr_in  # output-sample time of the newest input
        assert emitted >= (n - r.lookahead_in) * sr_out / sr_in
        assert max(now - r.delay_out, 0) <= emitted < max(now - r.delay_out, 0) + 2


def test_passthrough_is_identity_with_zero_latency() -> None:
    x = np.random.default_rng(1).standard_normal((1000, 2)).astype(np.float32)
    r = StreamingResampler(48000, 48000, channels=2)
    assert r.lookahead_in == r.delay_out == 0
    np.testing.assert_array_equal(r.process(x), x)
    assert len(r.flush()) == 0


@pytest.mark.parametrize("sr_in", [16000, 44100])
def test_zero_lag_against_resample_poly(sr_in: int) -> None:
    r = StreamingResampler(sr_in)
    x = np.random.default_rng(2).standard_normal(sr_in // 4).astype(np.float32)
    ours = resample(x, sr_in).astype(np.float64)
    ref = resample_poly(x.astype(np.float64), r.up, r.down)[: len(ours)]
    lags = np.arange(-20, 21)
    xcorr = [np.dot(ours[50:-50], np.roll(ref, lag)[50:-50]) for lag in lags]
    assert lags[int(np.argmax(xcorr))] == 0


@pytest.mark.parametrize("sr_in,sr_out", [(16000, 48000), (44100, 48000), (96000, 48000), (8000, 48000)])
def test_sine_phase_and_passband_gain(sr_in: int, sr_out: int) -> None:
    f = 0.8 * min(sr_in, sr_out) / 2  # 0.8 of the lower Nyquist: the top of the band we must keep flat
    x = np.sin(2 * np.pi * f * np.arange(sr_in // 2) / sr_in).astype(np.float32)
    y = resample(x, sr_in, sr_out)[1000:-1000]
    amp, phase = _tone_fit(y, f, sr_out)
    # zero lag: the fitted phase is that of sin(2 pi f t) at t = 1000 / sr_out, where the slice starts
    assert abs(np.angle(np.exp(1j * (phase - 2 * np.pi * f * 1000 / sr_out)))) < 1e-3
    assert abs(20 * np.log10(amp)) < 0.01


def test_filter_stopband() -> None:
    """Everything at or above the lower Nyquist is attenuated >= 90 dB (no images, no aliases)."""
    for up, down in [(3, 1), (160, 147), (1, 2)]:
        h = design_filter(up, down) * up
        span = max(up, down)
        mag = np.abs(np.fft.rfft(h, 1 << 20))
        freq = np.arange(len(mag)) / (1 << 20) * span  # in cycles per sample of the lower rate
        assert 20 * np.log10(mag[freq >= 0.5].max() / up) < -90
        assert np.ptp(20 * np.log10(mag[freq <= 0.45])) < 0.01


def test_kernel_matches_reference() -> None:
    rng = np.random.default_rng(3)
    for up, down, k in [(160, 147, None), (4, 3, 31), (1, 2, 17), (3, 1, 9)]:
        h = design_filter(up, down) if k is None else rng.standard_normal(k)
        x = rng.standard_normal((400, 2)).astype(np.float32)
        x0, m0, m1 = 50, 30, 30 + 450 * up // down  # outputs run off both ends of the buffer
        got = polyphase_resample(polyphase_bank(h, up), up, down, (len(h) - 1) // 2, x, x0, m0, m1)
        want = polyphase_resample_ref(h, up, down, x, x0, m0, m1)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_channels_are_independent() -> None:
    rng = np.random.default_rng(4)
    x = np.stack([rng.standard_normal(5000), np.zeros(5000), rng.standard_normal(5000)], axis=1)
    y = resample(x.astype(np.float32), 44100)
    for c in range(3):
        np.testing.assert_array_equal(y[:, c], resample(x[:, c].astype(np.float32), 44100))


def test_history_stays_bounded_and_reset_restarts() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((44100 * 3, 1)).astype(np.float32)
    r = StreamingResampler(44100)
    first = np.concatenate([r.process(x[i : i + 882]) for i in range(0, len(x), 882)])
    assert len(r._hist) <= 882 + r._bank.shape[1]
    r.reset()
    np.testing.assert_array_equal(np.concatenate([r.process(x[:5000]), r.process(x[5000:])]), first)


def test_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError):
        StreamingResampler(16000, channels=2).process(np.zeros((10, 1), np.float32))


@pytest.mark.parametrize("sr_in", [16000, 44100])
def test_the_intake_bank_gives_each_stream_the_same_bits_in_any_blocks(sr_in: int) -> None:
    """Streams in one bank, fed random blocks in one call per round (some ending on the way): each
    stream's 48 kHz samples are the bits it gets fed whole in a bank of its own, StreamingResampler's
    within float32 rounding (another compiled copy of the kernel may fuse multiply-adds otherwise),
    its frames the STFT's windowed frames of them (HALF zeros first); a row left is given to the
    next stream clean."""
    import gc

    import torch

    from rtsr.engine import Stream  # noqa: F401  (the engine's imports, as a stream makes a bank)
    from rtsr.features import stft
    from rtsr.intake import HALF, IntakeBank

    rng = np.random.default_rng(7)
    bank = IntakeBank(sr_in, 2)

    class Owner:  # a stream, as far as the bank is concerned
        pass

    def whole(x: np.ndarray) -> np.ndarray:
        b = IntakeBank(sr_in, 2)
        end = rate_filter(sr_in).total_out(len(x))
        owner = Owner()
        return b.take(np.array([b.join_for(owner)]), x, np.array([0, len(x)]), np.array([end]), np.array([0]),
                      np.array([True]))[2]

    def run(n_streams: int) -> None:
        owners = [Owner() for _ in range(n_streams)]
        rows = np.array([bank.join_for(o) for o in owners])
        keep = np.arange(n_streams) % 3 != 2
        xs = [rng.standard_normal((int(rng.integers(1, 9000)), 2)).astype(np.float32) for _ in rows]
        made = [[] for _ in rows]
        frames = [[] for _ in rows]
        pos, ended = [0] * n_streams, [False] * n_streams
        while not all(ended):
            blocks, ends = [], []
            for k, x in enumerate(xs):
                n = 0 if ended[k] else int(rng.choice([0, 1, int(rng.integers(2, 900))]))
                blocks.append(x[pos[k]:pos[k] + n])
                pos[k] += n
                end = not ended[k] and pos[k] >= len(x)
                ends.append((rate_filter(sr_in).total_out(len(x)), 0) if end else (-1, 0))
                ended[k] = ended[k] or end
            new_at = np.cumsum([0, *(len(b) for b in blocks)])
            ends = np.array(ends, np.int64)
            f, counts, y, y_counts = bank.take(rows, np.concatenate(blocks), new_at, ends[:, 0], ends[:, 1], keep)
            for k in range(n_streams):
                made[k].append(y[y_counts[:k].sum():y_counts[:k + 1].sum()])
                at = 2 * counts[:k].sum()
                frames[k].append(f[at:at + 2 * counts[k]].reshape(2, counts[k], f.shape[1]))
        for k in range(n_streams):
            got, ref = np.concatenate(made[k]), whole(xs[k])
            if keep[k]:
                np.testing.assert_array_equal(got, ref)
                np.testing.assert_allclose(got, resample(xs[k], sr_in), rtol=0, atol=3e-6)
            else:  # a stream not kept (its band tracker decided) gets no 48 kHz samples back, only its frames
                assert not len(got)
            x48 = np.concatenate([np.zeros((2, HALF), np.float32), ref.T], axis=1)
            spec = np.fft.rfft(np.concatenate(frames[k], axis=1), axis=-1)
            ref = stft(torch.from_numpy(x48)).numpy()
            np.testing.assert_allclose(spec, ref[:, :spec.shape[1]], atol=1e-4)
        owners.clear()  # the streams are gone: their rows go back
        gc.collect()

    run(5)
    run(7)  # rows reused, and the bank grown, with nothing left from the streams before
