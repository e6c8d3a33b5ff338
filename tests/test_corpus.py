"""Corpus builder: band edges and speech packing on synthetic audio (no Debian packages needed)."""

import numpy as np
import pytest
import soundfile as sf

from rtsr.training import corpus

SR = corpus.SR


def lowpassed_noise(cutoff_hz: float, seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """White noise with an FFT brick-wall low-pass: its true bandwidth is exactly cutoff_hz."""
    x = np.random.default_rng(seed).standard_normal(int(seconds * SR))
    spec = np.fft.rfft(x)
    spec[np.fft.rfftfreq(len(x), 1 / SR) > cutoff_hz] = 0
    return (0.1 * np.fft.irfft(spec, len(x))).astype(np.float32)


@pytest.mark.parametrize("cutoff", [3_000, 10_000, 20_000])
def test_band_edge_is_measured_per_file_and_narrow_files_stay_for_lower_cutoffs(cutoff: int, tmp_path) -> None:
    """A brick-wall band is found (to 100 Hz; at 3 kHz, under the cliff rule's 4 kHz floor, where the
    Hann window's leakage stops being digital silence, 400 Hz above); files narrower than 15 kHz are kept now
    (their segments train the cutoffs below their edge); under MIN_BAND_HZ they are dropped."""
    x = lowpassed_noise(cutoff)
    assert cutoff - 50 < corpus.band_edge_hz(x) < cutoff + (450 if cutoff < 4000 else 100)
    path = tmp_path / "clip.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    _, bw, reason = corpus.load_clip(str(path), 0.25)
    assert bw == corpus.band_edge_hz(x)
    assert reason == ("" if cutoff >= corpus.MIN_BAND_HZ else "narrowband")


def test_full_band_noise_is_full_band() -> None:
    x = np.random.default_rng(1).standard_normal(SR).astype(np.float32) * 0.1 + 0.5  # DC offset too
    assert corpus.band_edge_hz(x) == SR / 2


def test_trim_and_cut() -> None:
    x = np.concatenate([np.zeros(100), np.ones(SR * 25), np.zeros(50)]).astype(np.float32)
    y = corpus.trim_silence(x)
    assert len(y) == SR * 25 and y[0] == 1 and y[-1] == 1
    segs = corpus.cut_segments(y)
    assert len(segs) == 3 and sum(map(len, segs)) == len(y)
    assert all(len(s) <= corpus.MAX_SEG_S * SR for s in segs)
    assert corpus.cut_segments(y[: int(0.2 * SR)]) == []


def test_speech_packing() -> None:
    gap = int(corpus.SPEECH_GAP_S * SR)
    seconds = [1.0, 2.5, 3.0, 1.0, 0.5, 2.0, 12.0, 1.5]
    clips = [np.full(int(s * SR), i + 1, np.float32) for i, s in enumerate(seconds)]
    packs = list(corpus.pack_speech(clips))
    assert [ids for _, ids in packs] == [[0, 1, 2, 3], [4, 5], [6], [7]]
    audio, ids = packs[0]
    assert len(audio) == sum(len(clips[i]) for i in ids) + gap * (len(ids) - 1)
    assert np.all(audio[len(clips[0]):len(clips[0]) + gap] == 0)  # silent gap between clips
    assert all(len(a) <= corpus.SPEECH_TARGET_S * SR for a, ids in packs if len(ids) > 1)
    assert [len(s) for s in corpus.cut_segments(packs[2][0])] == [6 * SR] * 2  # 12 s clip: alone, halved


def test_split_is_deterministic_and_mostly_train() -> None:
    splits = [corpus.split_of(f"/x/{i}.ogg") for i in range(4000)]
    assert splits == [corpus.split_of(f"/x/{i}.ogg") for i in range(4000)]
    assert 0.03 < splits.count("val") / len(splits) < 0.07


def test_interleave_spreads_groups() -> None:
    assert corpus.interleave([[1, 2, 3], [4], [5, 6]]) == [1, 4, 5, 2, 6, 3]


def test_midi_seconds() -> None:
    # format 0, 96 ticks/quarter, tempo 250000 us/quarter, one note lasting 384 ticks = 1.0 s
    track = bytes([0, 0xFF, 0x51, 3, 0x03, 0xD0, 0x90,  # tempo
                   0, 0x90, 60, 100, 0x83, 0x00, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])  # note, 384 ticks, end
    header = b"MThd" + (6).to_bytes(4, "big") + bytes([0, 0, 0, 1, 0, 96])
    smf = header + b"MTrk" + len(track).to_bytes(4, "big")
    assert corpus.midi_seconds(smf + track) == pytest.approx(1.0)
