"""The Python API as the README shows it: fast defaults, a stream's output in upscale's layout,
rates and devices as users write them, every integer PCM type scaled right."""

from pathlib import Path

import numpy as np
import pytest
import torch

from rtsr import Upscaler
from rtsr.audio_spec import as_frames
from rtsr.onnx_backend import OnnxRun


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Upscaler:
    return Upscaler.load(str(tiny_model_dir))


def test_load_defaults_are_the_fast_ones(tiny_model_dir: Path) -> None:
    """One thread and the fastest backend, as the CLI runs: torch's default of every core made the
    README's example 10x slower on a busy machine."""
    torch.set_num_threads(2)
    up = Upscaler.load(str(tiny_model_dir))
    assert torch.get_num_threads() == 1
    assert isinstance(up.model.__dict__.get("run"), OnnxRun)


def test_a_mono_streams_output_has_upscales_shape(loaded: Upscaler) -> None:
    x = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    s = loaded.stream(16000)
    y = np.concatenate([s.feed(x[i:i + 1000]) for i in range(0, len(x), 1000)] + [s.flush()])
    ref = loaded.upscale(x, 16000)
    assert y.shape == ref.shape == (48000,)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    assert loaded.stream(16000).feed(x[:, None]).ndim == 2  # (frames, 1) in, (frames, 1) out


@pytest.mark.parametrize("rate", [16000.0, np.float32(16000), np.int64(16000)])
def test_an_integral_rate_of_any_numeric_type_is_taken(loaded: Upscaler, rate) -> None:
    x = (0.1 * np.random.default_rng(1).standard_normal(4000)).astype(np.float32)
    np.testing.assert_array_equal(loaded.upscale(x, rate), loaded.upscale(x, 16000))
    assert loaded.stream(rate).input_sr == 16000


def test_a_fractional_rate_is_refused_plainly(loaded: Upscaler) -> None:
    with pytest.raises(ValueError, match="whole number of Hz"):
        loaded.upscale(np.zeros(100, np.float32), 22050.5)


def test_devices_are_refused_in_the_apis_words(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown device 'gpu'.*'cpu', 'cuda'"):
        Upscaler.load(str(tiny_model_dir), device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda' asked for") as e:
            Upscaler.load(str(tiny_model_dir), device="cuda")
        assert "--device" not in str(e.value)


def test_integer_pcm_is_scaled_to_full_scale() -> None:
    """8-bit PCM is unsigned, centred at 128; signed types at 0."""
    got = as_frames(np.array([0, 128, 255], np.uint8), 1)[:, 0]
    np.testing.assert_allclose(got, [-1.0, 0.0, 127 / 128])
    np.testing.assert_allclose(as_frames(np.array([-32768, 0, 16384], np.int16), 1)[:, 0], [-1.0, 0.0, 0.5])
    np.testing.assert_allclose(as_frames(np.array([0, 2**15], np.uint16), 1)[:, 0], [-1.0, 0.0])


def test_leading_silence_is_held_back_and_fed_as_it_was(loaded: Upscaler) -> None:
    """Zeros before a sound are counted, not fed, until the sound comes: the output is the same
    bits as a stream fed everything at once; zeros only are zeros out."""
    from rtsr.cutoff import rate_band
    from rtsr.offline import OFFLINE_HOP_MS

    x = np.zeros((40000, 1), np.float32)
    x[30000:] = 0.1 * np.random.default_rng(2).standard_normal((10000, 1))
    band = rate_band(16000)
    got = np.concatenate(list(loaded.upscale_blocks([x[:10000], x[10000:20000], x[20000:]], 16000, 1, band)))
    s = loaded.stream(16000, 1, OFFLINE_HOP_MS, band)
    np.testing.assert_array_equal(got, np.concatenate([s.feed(x), s.flush()]))
    silent = loaded.upscale(np.zeros(16000, np.float32), 16000)
    assert silent.shape == (48000,) and not silent.any()
    assert loaded.upscale(np.zeros(0, np.float32), 16000).shape == (0,)


@pytest.mark.parametrize(("sr", "channels"), [(16000, 1), (44100, 2)])
def test_a_warm_up_makes_a_band_decision_and_matches_levels(loaded: Upscaler, monkeypatch, sr: int,
                                                             channels: int) -> None:
    """The warm-up stream reaches its band tracker's first decision and, taken as decoded from a
    lossy codec, runs the level matching, so none of their compiled kernels is compiled (or
    loaded) in the middle of the first live stream."""
    from rtsr import cutoff
    from rtsr.hopbank import HopBank

    decided, matched = [], []
    band_of, match_levels = cutoff.band_of, HopBank.match_levels
    monkeypatch.setattr(cutoff, "band_of", lambda *a: (decided.append(a[1]), band_of(*a))[1])
    monkeypatch.setattr(HopBank, "match_levels", lambda *a: (matched.append(1), match_levels(*a))[1])
    loaded.warm_up(sr, channels)
    assert decided == [sr] and matched
