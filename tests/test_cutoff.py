"""Band edge: real encoders and filters are found, full band is left alone, streams decide stably."""

import numpy as np
import pytest
from scipy import signal

from rtsr import SuperResModel, Upscaler, hopbank
from rtsr.bench_band import bank, codec_edge, encode, generated, judge, music_like, speech_like
from rtsr.cutoff import (
    DECIDE_AFTER,
    DECIDE_LAG,
    DETECT_FFT,
    DETECT_HOP,
    WATCH_CHECKS,
    WATCH_EVERY,
    Band,
    CutoffTracker,
    LongTermSpectrum,
    given_band,
    rate_band,
    scan_band,
)
from rtsr.engine import Stream
from rtsr.features import HOP, SR


@pytest.fixture(scope="module")
def labelled():
    return [judge(c) for c in bank(generated(seconds=2.0))]


def test_real_encoders_and_filters_are_found(labelled):
    """The labelled bank (LAME MP3, Vorbis, polyphase and FFT resamplers, IIR low-passes, phone band,
    on speech-, music- and effects-like material, mono and stereo): most edges found within 500 Hz."""
    edged = [r for r in labelled if r["true_edge_hz"] is not None]
    assert sum(r["ok"] for r in edged) >= 0.6 * len(edged)
    for codec in ("mp3-v9", "mp3-v6", "vorbis-q0"):  # what users have most: all found
        assert all(r["ok"] for r in edged if r["degradation"] == codec), codec


def test_full_band_gets_no_edge(labelled):
    full = [r for r in labelled if r["true_edge_hz"] is None]
    assert full and all(r["found_hz"] is None for r in full)
    assert {r["channels"] for r in full} == {1, 2}


def test_codec_edges_are_read_off_noise():
    assert 7000 < codec_edge("mp3-v9") < 8500 and 15000 < codec_edge("mp3-v6") < 17500


def test_natural_roll_off_and_quiet_levels_are_full_band():
    rng = np.random.default_rng(3)
    x = speech_like(48000, 2.0, rng)[:, None]
    for gain in (1.0, 1e-3):  # -60 dB: still full band, still found as such
        assert scan_band((gain * x).astype(np.float32), 48000) == rate_band(48000)


def test_a_soft_resampler_edge_under_weak_highs_is_found():
    """16 kHz speech whose highs are already weak (a 2nd-order roll-off from 2.5 kHz) stored as a
    16-bit 44.1 kHz WAV: the resamplers' skirts fall over ~1.5 kHz, no cliff; the soft pass finds it,
    and the same speech at full band gets no edge."""
    x = speech_like(48000, 3.0, np.random.default_rng(5))
    x = signal.sosfilt(signal.butter(2, 2500, fs=48000, output="sos"), x)
    x = 0.5 * x / np.abs(x).max()
    y = signal.sosfiltfilt(signal.cheby1(8, 0.05, 7840, fs=48000, output="sos"), x)
    y = signal.resample_poly(signal.resample_poly(y, 1, 3), 441, 160)
    pcm16 = lambda v: (np.round(v * 32767) / 32767).astype(np.float32)[:, None]  # noqa: E731
    band = scan_band(pcm16(y), 44100)
    assert band.source == "detected" and abs(band.hz - 7840) < 500, band
    assert scan_band(pcm16(x), 48000) == rate_band(48000)


def test_a_quiet_mp3_still_shows_its_edge():
    x = 1e-2 * music_like(44100, 2.0, np.random.default_rng(4))[:, None]
    y, sr = encode(x, "mp3-v6")
    band = scan_band(y, sr)
    assert band.source == "detected" and abs(band.hz - codec_edge("mp3-v6")) < 500


def test_silence_and_empty_input_keep_the_rate_band():
    assert scan_band(np.zeros((48000, 1), np.float32), 16000) == rate_band(16000)
    assert scan_band(np.zeros((0, 2), np.float32), 44100) == rate_band(44100)


def test_given_cutoffs_are_checked():
    assert given_band(4000, 48000) == Band(4000, "given")
    for bad in (0, 100, 999, 8001, float("nan")):
        with pytest.raises(ValueError, match="outside"):
            given_band(bad, 16000)


def test_merge_ranges_keep_the_input_below_an_edge():
    lo, hi = Band(8000, "detected").merge_range()
    assert 8000 < lo < hi <= 8000 * 1.1  # generated only above the edge
    assert Band(8000, "rate").merge_range() == pytest.approx((7440, 7840))
    assert np.isinf(rate_band(48000).merge_range()[0])  # a full band: nothing generated
    # a codec's low-pass is a brick wall: a lossy input fades from its edge itself
    assert Band(8000, "detected").merge_range(lossy=True) == (8000, 8300)
    assert Band(8000, "rate").merge_range(lossy=True) == Band(8000, "rate").merge_range()


# --- streaming ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return SuperResModel.random()


def phone_then_full(seconds_phone: float, seconds_full: float) -> np.ndarray:
    """48 kHz audio whose first part holds a 4 kHz band and whose rest is full band."""
    rng = np.random.default_rng(5)
    x = speech_like(48000, seconds_phone + seconds_full, rng)
    n = round(48000 * seconds_phone)
    spec = np.fft.rfft(x[:n])
    spec[np.fft.rfftfreq(n, 1 / 48000) > 4000] = 0
    x[:n] = np.fft.irfft(spec, n)
    return x[:, None].astype(np.float32)


def test_a_stream_lowers_its_cutoff_after_a_second_then_restores_it(model):
    x = phone_then_full(3.0, 3.0)
    s = Stream(model, 48000, 1)
    frames = []
    for i in range(0, len(x), 4800):
        s.feed(x[i:i + 4800])
        frames.append((s.analysed_frames, s.band))
    bands = [b for _, b in frames]
    assert bands[0] == rate_band(48000)
    lowered = next(k for k, b in enumerate(bands) if b.source == "detected")
    assert abs(bands[lowered].hz - 4000) < 500
    assert frames[lowered][0] * HOP / SR <= 1.6  # decided within ~1 s of active audio (+ a 200 ms step)
    assert bands[-1] == rate_band(48000)  # content above the edge arrived: restored, for good
    changes = sum(a != b for a, b in zip(bands, bands[1:], strict=False))
    assert changes == 2


def feed(tracker: CutoffTracker, x48: np.ndarray) -> None:
    """A block of a tracker's samples, as the engine gives them (rtsr.engine.analyse)."""
    if (until := tracker.take(x48)) is not None:
        tracker.spectrum.commit(until)
        tracker.decide()


def tracked(x: np.ndarray, block: int) -> list[tuple[int, Band, bool]]:
    """A band tracker fed x (48 kHz) in blocks, as the engine feeds it: each frame's band and
    whether the tracker still decides, per block."""
    tracker, t, out = CutoffTracker(48000, 1), 0, []
    for i in range(0, len(x), block):
        feed(tracker, x[i:i + block])
        t1 = (i + block) // HOP
        moved = tracker.decides_within(t, t1)
        rows = tracker.rows(t, t1)
        assert moved or (rows == rows[0]).all()  # no decision frame: one band over the frames
        t = t1
        out.append((t, tracker.current, tracker.deciding))
    return out


def tracked_rows(x: np.ndarray, block: int) -> list[tuple[Band, np.ndarray]]:
    """A band tracker alone fed x (48 kHz) in blocks as the engine feeds it: per block, its band
    and the band rows of the block's frames."""
    tracker, out = CutoffTracker(SR, 1), []
    for i in range(0, len(x), block):
        feed(tracker, x[i:i + block])
        out.append((tracker.current, tracker.rows(i // HOP, (i + block) // HOP)))
    return out


def test_a_decision_is_the_same_whenever_its_tracker_makes_it():
    """Trackers at other turns make their decisions in other blocks (a server's streams that
    started together do not all decide in one round) and give every frame the same band."""
    x = phone_then_full(2.5, 2.0)
    runs = []
    for turn in (1, DECIDE_LAG // 2, DECIDE_LAG):
        tracker, t, rows, made_at = CutoffTracker(48000, 1), 0, [], []
        tracker.turn = turn
        for i in range(0, len(x), 960):
            feed(tracker, x[i:i + 960])
            if tracker.pending is not None:
                made_at.append(i)
            rows.append(tracker.rows(t, (i + 960) // HOP))
            t = (i + 960) // HOP
        runs.append((np.concatenate(rows), made_at))
    assert len({tuple(made_at) for _, made_at in runs}) == 3
    assert all(np.array_equal(rows, runs[0][0]) for rows, _ in runs)
    assert (np.diff(runs[0][0][:, 0]) != 0).sum() == 2  # lowered, then restored


def test_a_lowered_band_is_watched_for_ten_seconds_then_settled():
    """Lowered at ~1 s, checked each second for content above it: full-band content after ten
    checks no longer restores it (the watching ends, and its cost), content before them does."""
    late = tracked(phone_then_full(12.5, 2.0), 4800)
    assert late[-1][1].source == "detected" and not late[-1][2]
    settled = next(t for t, _, deciding in late if not deciding)
    lowered = next(t for t, band, _ in late if band.source == "detected")
    assert settled - lowered == pytest.approx(WATCH_CHECKS * WATCH_EVERY, abs=120)  # 120 frames: a block
    early = tracked(phone_then_full(5.0, 2.0), 4800)
    assert early[-1][1] == rate_band(48000) and not early[-1][2]


def test_the_long_term_spectrum_does_not_depend_on_block_sizes():
    """Committed at the same sample positions, any blocks give the same sums bit for bit, and a
    commit counts only the frames whose samples have all come (the rest wait for the next)."""
    x = (np.random.default_rng(1).standard_normal((5 * DETECT_FFT, 2)) * [0.1, 0.001]).astype(np.float32)
    x[DETECT_FFT:2 * DETECT_FFT] = 0  # silent frames are not counted
    commits = [DETECT_FFT + 100, 3 * DETECT_FFT, 3 * DETECT_FFT + 1, len(x)]

    def spectrum(cuts: list[int]) -> tuple[LongTermSpectrum, list[int]]:
        lts, counted = LongTermSpectrum(2), []
        for a, b in zip([0, *cuts], [*cuts, len(x)], strict=True):
            lts.feed(x[a:b])
            for until in commits:
                if a < until <= b:
                    lts.commit(until)
                    counted.append(lts.active)
        return lts, counted

    whole, counted = spectrum([])
    assert counted == [1, 4, 4, 8]  # frames ending by each commit (9 in all), frame 2 silent
    rng = np.random.default_rng(2)
    for _ in range(3):
        cuts = sorted(set(rng.integers(1, len(x), 12).tolist()) | set(commits[:-1]))
        split, split_counted = spectrum(cuts)
        split.commit()
        assert split_counted == counted and split.active == whole.active
        assert np.array_equal(split.power, whole.power)
    early = LongTermSpectrum(2)
    early.feed(x[:3 * DETECT_FFT - 1])
    early.commit(3 * DETECT_FFT)  # its last frame's samples have not all come
    early.feed(x[3 * DETECT_FFT - 1:])
    early.commit()
    assert np.array_equal(early.power, whole.power)


@pytest.mark.parametrize("lossy", [False, True])
def test_streamed_cutoffs_do_not_depend_on_block_sizes(model, lossy, monkeypatch):
    """Offline == streamed with the cutoff moving: the output of any block sizes is the same (lossy:
    with the codec edge's fade and its model band's level over the last frames, rtsr.hopbank; loud
    enough that the random model's band is raised)."""
    x = phone_then_full(1.5, 1.0) * (16 if lossy else 1)
    ref = Stream(model, 48000, 1, fill_holes=lossy)
    whole = np.concatenate([ref.feed(x), ref.flush()])
    if lossy:
        monkeypatch.setattr(hopbank, "MAX_LEVEL_GAIN", 1.0)
        same = Stream(model, 48000, 1, fill_holes=lossy)
        assert not np.array_equal(whole, np.concatenate([same.feed(x), same.flush()]))  # the levels acted
        monkeypatch.undo()
    rng = np.random.default_rng(0)
    s = Stream(model, 48000, 1, fill_holes=lossy)
    out, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 9000))
        out.append(s.feed(x[i:i + n]))
        i += n
    streamed = np.concatenate(out + [s.flush()])
    assert streamed.shape == whole.shape == x.shape
    assert np.abs(streamed - whole).max() <= 1e-4 * np.abs(whole).max()


def test_decision_waits_for_active_audio(model):
    """Silence first: nothing is decided until a second of signal has come."""
    x = np.concatenate([np.zeros((3 * 48000, 1), np.float32), phone_then_full(2.0, 0.0)])
    s = Stream(model, 48000, 1)
    s.feed(x[:3 * 48000])
    assert s.band == rate_band(48000)
    s.feed(x[3 * 48000:])
    assert s.band.source == "detected"
    assert DECIDE_AFTER * DETECT_HOP >= 48000  # "a second" is at least one


def test_a_file_is_extended_from_its_first_sample(model):
    """Offline, a scanned file's band is fixed from the start; equal to a stream opened with it."""
    x = phone_then_full(2.0, 0.0)
    up = Upscaler(model)
    band = up.find_band(x, 48000)
    assert band.source == "detected"
    s = up.stream(48000, 1, 20.0, band)
    streamed = np.concatenate([s.feed(x), s.flush()])
    np.testing.assert_allclose(up.upscale(x, 48000), streamed, atol=1e-4 * np.abs(streamed).max())


def test_spectra_committed_together_are_the_ones_committed_each_alone():
    """`due_spectra`: the frames of several trackers' spectra (mono and stereo, some with none
    due) through one FFT call count the same powers, bit for bit, as each `commit` alone."""
    from rtsr.cutoff import DETECT_FFT, DETECT_HOP, LongTermSpectrum, due_spectra

    rng = np.random.default_rng(3)
    lengths, channels = [3 * DETECT_FFT, DETECT_FFT - 1, 5 * DETECT_HOP + 7, 2 * DETECT_FFT], [1, 2, 1, 2]
    together, alone = [LongTermSpectrum(c) for c in channels], [LongTermSpectrum(c) for c in channels]
    for part in range(2):
        xs = [(0.1 * rng.standard_normal((n, c))).astype(np.float32) for n, c in zip(lengths, channels, strict=True)]
        untils = [lts.fed + len(x) - part * DETECT_HOP for lts, x in zip(together, xs, strict=True)]
        for a, b, x in zip(together, alone, xs, strict=True):
            a.feed(x)
            b.feed(x)
        spectra = due_spectra(list(zip(together, untils, strict=True)))
        assert (spectra[1] is None) == (part == 0)  # under one frame fed, at first
        for lts, spec in zip(together, spectra, strict=True):
            if spec is not None:
                lts.count(spec)
        for b, until in zip(alone, untils, strict=True):
            b.commit(until)
        for a, b in zip(together, alone, strict=True):
            assert (a.base, a.held, a.active) == (b.base, b.held, b.active) and np.array_equal(a.power, b.power)
    assert sum(lts.active for lts in together) > 0 and together[1].base > 0


def test_trackers_fed_alike_commit_in_different_rounds_and_decide_alike():
    """Streams that started together feed their trackers the same samples at the same time; each
    commits its detector frames at a held count of its own (by its turn), so a round's FFT call
    is not every tracker's at once, and each gives every frame the band a tracker alone gives."""
    x = phone_then_full(3.0, 0.0)
    trackers, block = [CutoffTracker(SR, 1) for _ in range(DECIDE_LAG)], SR // 50
    committing, rows = [], [[] for _ in trackers]
    for i in range(0, len(x), block):
        committing.append(0)
        for t, r in zip(trackers, rows, strict=True):
            if (until := t.take(x[i:i + block])) is not None:
                committing[-1] += t.spectrum.due(until) > 0
                t.spectrum.commit(until)
                t.decide()
            r.append(t.rows(i // HOP, (i + block) // HOP))
    assert sum(committing) > 2 * len(trackers) and max(committing) <= len(trackers) // 2
    alone = [frames for _, frames in tracked_rows(x, block)]
    assert all(np.array_equal(np.concatenate(r), np.concatenate(alone)) for r in rows)
    assert abs(trackers[0].current.hz - 4000) < 500 and trackers[0].lowered
