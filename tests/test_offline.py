"""Offline upscaling cut into segments and batched (rtsr.offline): the bits of one stream over the
whole signal, whatever the cut, the batch or the threads."""

from pathlib import Path

import numpy as np
import pytest

from rtsr import hopbank
from rtsr.cutoff import Band
from rtsr.features import HOP, SR
from rtsr.model import SuperResModel
from rtsr.offline import OFFLINE_HOP_MS, Signal, plan, upscale_signals
from rtsr.training.export import export
from rtsr.upscaler import Upscaler


@pytest.fixture(scope="module")
def regression(tmp_path_factory: pytest.TempPathFactory) -> Upscaler:
    """A tiny one-pass regression (no noise: it can be cut), on the default backend."""
    m = SuperResModel.random(steps=0)
    path = export(m.denoiser, m.vocoder, tmp_path_factory.mktemp("models") / "reg", "reg", 0, 1.0, {})
    return Upscaler.load(str(path))


def signal(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(sr * seconds)) / sr
    x = 0.2 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(len(t))
    return x.astype(np.float32)[:, None]


def one_stream(up: Upscaler, x: np.ndarray, sr: int) -> np.ndarray:
    s = up.stream(sr, x.shape[1], OFFLINE_HOP_MS, up.find_band(x, sr))
    return np.concatenate([s.feed(x), s.flush()])


@pytest.mark.parametrize("sr", [16000, 44100, 11025])
def test_segments_put_together_are_one_streams_bits(regression: Upscaler, sr: int) -> None:
    x = signal(sr, 31.7)
    ref = one_stream(regression, x, sr)
    assert len(plan(0, len(x), sr, regression, 3)) == 3
    for rows, workers in ((1, 1), (3, 1), (3, 2)):
        y = upscale_signals(regression, [Signal(x, sr)], rows=rows, workers=workers)[0]
        assert np.array_equal(y, ref), (rows, workers)


def test_a_lossy_signal_cut_gives_one_streams_bits(regression: Upscaler, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lossy input's model band follows the input's level over its last frames (rtsr.hopbank):
    the cut still gives one stream's bits."""
    x = signal(44100, 31.7) + 0.3 * np.random.default_rng(1).standard_normal((44100 * 317 // 10, 1)).astype(np.float32)
    band = Band(6000.0, "given")
    s = regression.stream(44100, 1, OFFLINE_HOP_MS, band, fill_holes=True)
    ref = np.concatenate([s.feed(x), s.flush()])
    assert len(plan(0, len(x), 44100, regression, 3)) == 3
    y = upscale_signals(regression, [Signal(x, 44100, band, fill_holes=True)], rows=3)[0]
    assert np.array_equal(y, ref)
    monkeypatch.setattr(hopbank, "MAX_LEVEL_GAIN", 1.0)  # the levels did act
    assert not np.array_equal(y, upscale_signals(regression, [Signal(x, 44100, band, fill_holes=True)], rows=3)[0])


def test_a_signal_gives_the_same_bits_alone_and_in_a_batch(regression: Upscaler) -> None:
    """Also with the batch's bands scanned on two threads, one band given among them."""
    signals = [Signal(signal(16000, 12.3, 1), 16000), Signal(signal(16000, 8.2, 4), 16000, Band(5000.0, "given")),
               Signal(signal(44100, 9.1, 2), 44100), Signal(np.repeat(signal(8000, 17.0, 3), 2, axis=1), 8000)]
    batch = upscale_signals(regression, signals, rows=2)
    assert all(np.array_equal(a, b) for a, b in zip(batch, upscale_signals(regression, signals, rows=2, workers=2),
                                                    strict=True))
    for sig, y in zip(signals, batch, strict=True):
        assert np.array_equal(y, upscale_signals(regression, [sig], rows=2)[0])
        assert np.array_equal(y, regression.upscale(sig.x, sig.sr, sig.band))
        assert np.array_equal(y, Upscaler(regression.model, workers=2).upscale(sig.x, sig.sr, sig.band))


def test_a_model_whose_noise_matters_is_not_cut(tiny_model_dir: Path) -> None:
    up = Upscaler.load(str(tiny_model_dir), backend="eager")  # a 2-step sampler at temperature 1
    assert len(plan(0, 16000 * 60, 16000, up, 8)) == 1
    up.model.temperature = 0.0
    assert len(plan(0, 16000 * 60, 16000, up, 8)) > 1


def test_segments_cover_the_signal_once(regression: Upscaler) -> None:
    for n, sr, rows in ((1, 16000, 4), (16000 * 100 + 7, 16000, 4), (44100 * 31 + 5, 44100, 2)):
        segs = plan(0, n, sr, regression, rows)
        assert segs[0].keep == 0 and segs[-1].stop == segs[-1].end == n
        assert all(a.stop == b.keep for a, b in zip(segs, segs[1:], strict=False))
        assert all(s.start <= s.keep < s.stop <= s.end for s in segs)
        hop = round(OFFLINE_HOP_MS * SR / 1000)  # a whole stream's hop, in 48 kHz samples
        starts, stops = [s.start * SR // sr for s in segs], [s.stop * SR / sr for s in segs]
        assert all(start % HOP == 0 for start in starts) and starts[-1] % hop == 0
        assert all(0 < start + k * hop - stop <= HOP * 8 for start, stop in zip(starts, stops[:-1], strict=False)
                   for k in [-(-(stop - start) // hop)])  # each kept part ends in its last whole hop


def test_the_shipped_model_cut_gives_one_streams_bits() -> None:
    """`basic` under ONNX Runtime, whose matrix products give some frames other bits in a hop of
    a few dozen frames: every kept frame of a segment comes from a whole hop."""
    up = Upscaler.load("basic")
    x = signal(16000, 25.0)
    ref = upscale_signals(up, [Signal(x, 16000)], rows=1)[0]
    assert np.array_equal(upscale_signals(up, [Signal(x, 16000)], rows=3, workers=2)[0], ref)
