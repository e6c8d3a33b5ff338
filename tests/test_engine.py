"""Engine behaviour: streaming == offline, exact length, zero lag, low band kept, latency."""

import numpy as np
import pytest
from scipy import signal

from rtsr import SuperResModel, Upscaler
from rtsr.cutoff import Band, rate_band
from rtsr.engine import Stream, merge_low_band
from rtsr.resample import resample

RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100]


@pytest.fixture(scope="module")
def model():
    return SuperResModel.random()


def noise(sr, seconds, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    x = signal.lfilter([1], [1, -0.9], rng.standard_normal((int(sr * seconds), channels)), axis=0)
    return (0.05 * x).astype(np.float32)


def stream_in_blocks(model, x, sr, rng, hop_ms=20.0, **stream_args):
    s = Stream(model, sr, x.shape[1], hop_ms, **stream_args)
    out, i = [], 0
    while i < len(x):
        n = int(np.exp(rng.uniform(0, np.log(sr))))  # 1 sample ... 1 s, log-uniform
        out.append(s.feed(x[i:i + n]))
        i += n
    out.append(s.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("sr", RATES)
def test_streaming_equals_offline(model, sr):
    x = noise(sr, 0.6)
    offline = Upscaler(model).upscale(x, sr)
    streamed = stream_in_blocks(model, x, sr, np.random.default_rng(sr))
    assert streamed.shape == offline.shape == (round(len(x) * 48000 / sr), 1)
    assert np.abs(streamed - offline).max() <= 1e-4 * np.abs(offline).max()


def test_a_long_block_queues_no_more_frames_than_live_blocks():
    """Two seconds fed at once run hop after hop as 20 ms blocks do, and the frames queued ahead
    of the hops stay as few (each analysis takes a little more than a hop's input: analysed at
    every hop, a block's frames piled up, 2 more a hop, and every stream of the bank kept room for
    them: 128 frames a row after a 1.6 s block)."""
    x = noise(16000, 2.0)
    whole, live = (Stream(SuperResModel.random(), 16000) for _ in range(2))
    y = np.concatenate([whole.feed(x), whole.flush()])
    y_live = np.concatenate([live.feed(x[i:i + 320]) for i in range(0, len(x), 320)] + [live.flush()])
    np.testing.assert_array_equal(y, y_live)
    assert whole.hops.spec.shape[1] == live.hops.spec.shape[1] <= 16


def test_one_sample_blocks_equal_offline(model):
    x = noise(16000, 0.15)
    s = Stream(model, 16000, 1, 10.0)
    y = np.concatenate([s.feed(x[i:i + 1]) for i in range(len(x))] + [s.flush()])
    ref = Upscaler(model).upscale(x, 16000)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("n", [0, 1, 2, 7, 239, 240, 241, 1000])
def test_exact_length_for_tiny_inputs(model, n):
    x = noise(16000, 1.0)[:n]
    assert Upscaler(model).upscale(x[:, 0], 16000).shape == (round(n * 3),)


@pytest.mark.parametrize("sr", [8000, 16000, 24000])
def test_low_band_is_the_input_and_zero_lag(model, sr):
    x = noise(sr, 1.5)[:, 0]
    y = Upscaler(model).upscale(x, sr)
    r = resample(x, sr)
    sos = signal.butter(10, 0.9 * 0.95 * sr / 2, fs=48000, output="sos")
    a, b = signal.sosfiltfilt(sos, r), signal.sosfiltfilt(sos, y)
    assert 10 * np.log10(np.sum(a ** 2) / np.sum((a - b) ** 2)) >= 35.0
    c = signal.correlate(b, a, mode="full")
    assert np.argmax(np.abs(c[len(a) - 1 - 200:len(a) + 200])) - 200 == 0


def test_multichannel_keeps_channels(model):
    x = noise(16000, 0.5, channels=8)
    x[:, 3] *= 0.0  # a silent channel's band stays silent (above it is the untrained model's)
    y = Upscaler(model).upscale(x, 16000)
    assert y.shape == (24000, 8)
    sos = signal.butter(10, 6000, fs=48000, output="sos")
    spec = np.abs(np.fft.rfft(y[:, 3])) ** 2
    # below 4 kHz only window leakage of the untrained model's frame-to-frame random phases
    assert spec[: len(spec) // 6].sum() < 1e-4 * spec.sum()
    for c in (0, 5):
        ref = signal.sosfiltfilt(sos, resample(x[:, c], 16000))
        assert np.corrcoef(signal.sosfiltfilt(sos, y[:, c]), ref)[0, 1] > 0.999


@pytest.mark.parametrize("hop_ms", [5.0, 10.0, 20.0])
@pytest.mark.parametrize("sr", [16000, 24000])
def test_latency_is_what_the_parameters_say(model, hop_ms, sr):
    """Feed one sample at a time and record when each output sample is handed out: the worst
    delay equals the computed latency to within one input sample (SR/sr output samples)."""
    s = Stream(model, sr, 1, hop_ms)
    x = noise(sr, 0.2)
    step = 48000 // sr
    emitted, worst = 0, 0
    for i in range(len(x)):
        n = len(s.feed(x[i:i + 1]))
        if n:  # output samples [emitted, emitted + n) went out when input sample i arrived
            worst = max(worst, step * i - emitted)
            emitted += n
    assert s.latency_samples - step < worst <= s.latency_samples


def test_full_band_stream_passes_through_at_once(model):
    s = Stream(model, 48000, 1, cutoff=rate_band(48000))  # what a scan finds in a full-band file
    assert s.latency_samples == 0 and len(s.feed(np.zeros(100, np.float32))) == 100


def test_live_high_rate_stream_runs_the_engine_to_find_its_band(model):
    """A live 48 kHz stream may hold a phone band: it is not passed through blind."""
    s = Stream(model, 48000, 1)
    assert not s.passthrough and s.latency_samples > 0 and s.band == rate_band(48000)


def test_latency_budget_at_20ms_hops(model):
    assert Stream(model, 16000, 1, 20.0).latency_ms <= 40.0


def test_bad_blocks_raise_clear_errors(model):
    s = Stream(model, 16000, 2)
    with pytest.raises(ValueError, match="NaN/Inf"):
        s.feed(np.full((10, 2), np.nan, np.float32))
    one_inf = np.zeros((10, 2), np.float32)
    one_inf[7, 1] = -np.inf
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        s.feed(one_inf)
    with pytest.raises(ValueError, match="expected"):
        s.feed(np.zeros((10, 3), np.float32))
    with pytest.raises(ValueError, match="hop_ms"):
        Stream(model, 16000, 1, 7.0)
    with pytest.raises(ValueError, match="outside"):
        Stream(model, 100, 1)
    s.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        s.feed(np.zeros((1, 2), np.float32))


def test_int16_blocks_are_scaled(model):
    x = (noise(16000, 0.3)[:, 0] * 32767).astype(np.int16)
    y = Upscaler(model).upscale(x.astype(np.float32) / 32768, 16000)
    s = Stream(model, 16000, 1, 500.0)
    z = np.concatenate([s.feed(x), s.flush()])  # 1-D in, 1-D out
    assert np.abs(y - z).max() < 1e-5


def test_high_rate_input_is_downsampled_not_generated(model):
    x = noise(96000, 0.2)[:, 0]
    y = Upscaler(model).upscale(x, 96000)
    assert np.array_equal(y, resample(x, 96000))
    with pytest.raises(ValueError, match="NaN/Inf"):
        Upscaler(model).upscale(np.full(100, np.inf, np.float32), 96000)
    with pytest.raises(ValueError, match="outside"):
        Upscaler(model).upscale(x, 768000)


def test_merge_low_band_fills_only_codec_holes():
    """Filling takes the model's cell only where the input has its whole weight and is, with its
    neighbours, > 10 dB under it: a zeroed band, not a one-bin valley between harmonics nor a shallow
    dip, and not the empty top of the fade above the edge (the fade stays as designed)."""
    rng = np.random.default_rng(0)
    gen = (rng.standard_normal((1, 6, 241)) + 1j * rng.standard_normal((1, 6, 241))).astype(np.complex64)
    gen = gen / np.abs(gen)  # unit power everywhere: the test's levels are exact
    lr = (gen * 0.9).copy()
    lr[0, 2, 50:60] = 0.01 * gen[0, 2, 50:60]  # a zeroed band: -40 dB over 1 kHz
    lr[0, 2, 188:195] = 0  # the input's empty top in the fade: not a hole
    lr[0, 3, 70] = 0  # a one-bin valley: kept
    lr[0, 3, 90:100] = 0.5 * gen[0, 3, 90:100]  # a dip of -6 dB: content, kept
    lr[0, 4, 220:230] = 0  # above the band (no input weight): the model's anyway
    w = np.clip((200 - np.arange(241)) / 20, 0, 1).astype(np.float32)  # input up to bin 180, gone from 200
    kept = merge_low_band(lr, gen, w)
    np.testing.assert_allclose(kept, w * lr + (1 - w) * gen)
    filled = merge_low_band(lr, gen, w, fill_holes=True)
    hole = np.zeros(lr.shape, bool)
    hole[0, 2, 51:59] = True  # a hole's edge cells see content beside them
    np.testing.assert_array_equal(filled[hole], gen[hole])
    np.testing.assert_array_equal(filled[~hole], kept[~hole])


def carve_holes(x: np.ndarray, sr: int) -> np.ndarray:
    """What an MP3 encoder does when bits run short: a band zeroed in some granules (here 5-7 kHz in
    every other 20 ms)."""
    f, t, z = signal.stft(x[:, 0], sr, nperseg=512)
    z[(f > 5000) & (f < 7000), ::4] = 0
    z[(f > 5000) & (f < 7000), 1::4] = 0
    return signal.istft(z, sr, nperseg=512)[1][:len(x), None].astype(np.float32)


def test_a_lossy_stream_with_an_edge_equals_offline_at_any_blocks(model):
    """Its model band's level follows the input's over the last frames (rtsr.hopbank): the
    same for any block sizes, mono or stereo."""
    sr, band = 44100, Band(7000.0, "given")
    for channels in (1, 2):
        x = 0.3 * np.random.default_rng(channels).standard_normal((sr, channels)).astype(np.float32)
        filled = Upscaler(model).upscale(x, sr, band, fill_holes=True)
        streamed = stream_in_blocks(model, x, sr, np.random.default_rng(2), cutoff=band, fill_holes=True)
        assert np.abs(streamed - filled).max() <= 1e-4 * np.abs(filled).max()


def test_filled_holes_stream_equals_offline_and_fill_the_holes(model):
    sr = 22050
    x = 0.3 * np.random.default_rng(0).standard_normal((sr, 1)).astype(np.float32)
    x = carve_holes(x, sr)
    band = rate_band(sr)
    up = Upscaler(model)
    kept, filled = up.upscale(x, sr, band), up.upscale(x, sr, band, fill_holes=True)
    streamed = stream_in_blocks(model, x, sr, np.random.default_rng(1), cutoff=band, fill_holes=True)
    assert np.abs(streamed - filled).max() <= 1e-4 * np.abs(filled).max()
    _, _, zk = signal.stft(kept[:, 0], 48000, nperseg=960)
    _, _, zf = signal.stft(filled[:, 0], 48000, nperseg=960)
    f = np.arange(zk.shape[0]) * 50.0
    changed = np.abs(zf - zk).sum(axis=1) / np.abs(zk).sum(axis=1)
    holes, content = (f > 5800) & (f < 6200), (f < 4500) | ((f > 7500) & (f < 9000))
    assert changed[holes].min() > 5 * np.median(changed[content])  # the holes, not the content
