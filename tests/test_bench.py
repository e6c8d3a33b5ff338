"""`rtsr bench` and `rtsr compare` with the tiny random model: impulse latency, the scorer's metrics,
the naive baseline's level, JSON reports that parse, and a PNG. Durations are tiny: these check
the machinery, not this machine's speed."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy import signal

from rtsr import SuperResModel, Upscaler
from rtsr.bench import measure_latency
from rtsr.bench_quality import (
    _passes,
    band_edge_bin,
    load_for_scoring,
    power_spec,
    score,
    score_inband,
    score_realism,
    scoring_cutoff,
    to_scoring_rate,
    visqol_moslqo,
)
from rtsr.cli import main
from rtsr.naive import extend

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval-dev"  # CI: ../shared beside the repo


@pytest.fixture(autouse=True)
def one_thread():
    """As the benches run: more threads than free cores make torch many times slower here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def white(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(round(sr * seconds))).astype(np.float32)


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_impulse_latency_is_the_computed_latency():
    """At 24 kHz one input sample is two output samples: the worst measured delay is the formula's
    to within that step (48 kHz input is passed through without the model)."""
    lat = measure_latency(Upscaler(SuperResModel.random()), 24000, 10.0)
    assert lat["computed_samples"] - 2 < lat["measured_worst_samples"] <= lat["computed_samples"]
    assert lat["measured_best_ms"] < lat["measured_worst_ms"]
    assert all(abs(lag) <= 1 for lag in lat["peak_lags_48k"])


def test_realism_sees_transients_and_noisiness_that_lsd_averages_away():
    """Clicks in 4 kHz-wide noise bursts: the same high band scores envelope corr 1 and flatness 1;
    noise at the band's mean level (what a predictor of the mean gives) has no envelope (corr ~0),
    bursts 100 ms late anti-correlate, an empty band has no envelope."""
    rng = np.random.default_rng(0)
    n = 48000 * 3
    gate = (np.arange(n) // 4800) % 5 == 0  # a 100 ms burst every 0.5 s
    hf = rng.standard_normal(n) * (0.02 + gate)
    spec = np.fft.rfft(hf)
    spec[np.fft.rfftfreq(n, 1 / 48000) < 12000] = 0
    hf = np.fft.irfft(spec, n)
    low = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * (np.fft.rfftfreq(n, 1 / 48000) < 11000), n)
    ref = low + hf
    same = score_realism(ref, ref.copy(), 11400.0)
    assert same["hf_envelope_corr"] == pytest.approx(1.0) and same["hf_flatness_ratio"] == pytest.approx(1.0)
    mean_band = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * (np.fft.rfftfreq(n, 1 / 48000) >= 12000), n)
    mean_band *= np.sqrt(np.mean(hf ** 2) / np.mean(mean_band ** 2))
    shifted = low + np.roll(hf, 4800)
    flat = score_realism(ref, low + mean_band, 11400.0)
    assert abs(flat["hf_envelope_corr"]) < 0.2 < 0.9 < same["hf_envelope_corr"]
    assert score_realism(ref, shifted, 11400.0)["hf_envelope_corr"] < 0
    assert abs(score_realism(ref, low, 11400.0)["hf_envelope_corr"]) < 0.1  # an empty band: no envelope
    tone = low + np.sqrt(2 * np.mean(hf ** 2)) * np.sin(2 * np.pi * 15000 * np.arange(n) / 48000)
    assert score_realism(ref, tone, 11400.0)["hf_flatness_ratio"] < 0.2  # a whistle is not noise


def test_metrics_on_a_synthetic_pair():
    """Known answers: x vs 10x is 2 decades of power everywhere; a delayed copy has that lag."""
    x = white(48000, 2.0).astype(np.float64)  # full band: no bin at the power floor
    s = score(x, 10 * x, scoring_cutoff(16000))
    assert s["lsd"] == pytest.approx(2.0) and s["lsd_hf"] == pytest.approx(2.0) and s["lsd_lf"] == pytest.approx(2.0)
    assert s["lag_samples"] == 0
    assert score(x, np.concatenate([np.zeros(7), x]), 7600.0)["lag_samples"] == 7
    assert score(x, x.copy(), 7600.0)["snr_lowband_db"] > 150


@pytest.mark.skipif(not (EVAL / "score.py").exists(), reason="no shared/eval-dev beside the repo")
def test_metrics_match_the_reference_scorer():
    """rtsr's reimplementation gives score.py's numbers on a dev clip (naive output, so HF is non-trivial)."""
    spec = importlib.util.spec_from_file_location("eval_dev_score", EVAL / "score.py")
    ref_scorer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_scorer)
    hr, lr = EVAL / "hr" / "speech_tux-dev_0.flac", EVAL / "lr" / "speech_tux-dev_0_8000.wav"
    ref = load_for_scoring(hr)
    np.testing.assert_array_equal(ref, ref_scorer.load(str(hr)))
    x, sr = sf.read(lr, dtype="float32")
    est = to_scoring_rate(extend(x, sr), 48000)
    ours, theirs = score(ref, est, scoring_cutoff(sr)), ref_scorer.score(ref, est, sr / 2 * 0.95)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-9), k
    ours, theirs = score_inband(ref, est, scoring_cutoff(sr)), ref_scorer.score_inband(ref, est, sr / 2 * 0.95)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-9), k


@pytest.mark.skipif(not (EVAL / "score.py").exists(), reason="no shared/eval-dev beside the repo")
def test_visqol_matches_the_reference_scorer():
    """score.py's ViSQOL on the first second of a dev clip (naive output): the same MOS-LQO; a copy of
    the reference scores near the top of the scale."""
    pytest.importorskip("visqol")
    spec = importlib.util.spec_from_file_location("eval_dev_score", EVAL / "score.py")
    ref_scorer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_scorer)
    ref = load_for_scoring(EVAL / "hr" / "speech_tux-dev_0.flac")[:48000]
    x, sr = sf.read(EVAL / "lr" / "speech_tux-dev_0_8000.wav", dtype="float32")
    est = to_scoring_rate(extend(x[:sr], sr), 48000)
    ours = visqol_moslqo(ref, est)
    assert ours == pytest.approx(ref_scorer.visqol_moslqo(ref, est), rel=1e-9)
    assert 1 <= ours < visqol_moslqo(ref, ref.copy()) and visqol_moslqo(ref, ref.copy()) > 4


@pytest.mark.skipif(not (EVAL / "score.py").exists(), reason="no shared/eval-dev beside the repo")
def test_band_edge_matches_the_reference_scorer_on_every_dev_reference():
    """Full-band references and those under a codec cliff: the same edge bin as score.py's."""
    spec = importlib.util.spec_from_file_location("eval_dev_score", EVAL / "score.py")
    ref_scorer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_scorer)
    edges = []
    for hr in sorted((EVAL / "hr").glob("*.flac")):
        p = power_spec(load_for_scoring(hr))
        edges.append(band_edge_bin(p))
        assert edges[-1] == ref_scorer.ref_band_edge_bin(p), hr.name
    assert min(edges) < 900 and max(edges) == 1025  # both cases are covered


def test_naive_extension_continues_the_top_octave_at_its_slope():
    """White noise at 16 kHz: the band above 8 kHz falls 12 dB/octave from the 4-7 kHz level."""
    x = white(16000, 3.0)
    y = extend(x, 16000)
    assert y.shape == (3 * len(x),)
    f, p = signal.welch(y, 48000, nperseg=4096)

    def level(lo: float, hi: float) -> float:
        return 10 * np.log10(p[(f >= lo) & (f < hi)].mean())

    expected = -12 * np.log2(np.sqrt(10000 * 11000) / np.sqrt(4000 * 7040))  # from the octave's centre
    assert level(10000, 11000) - level(4000, 7040) == pytest.approx(expected, abs=1.0)


def test_bench_latency_json(capsys, tiny_model_dir):
    r = run_json(capsys, "bench", "latency", "--model", str(tiny_model_dir), "--seconds", "0.3", "--streams", "2",
                 "--repeat", "3", "--json")
    assert r["latency"]["computed_samples"] == 1634  # 16 kHz, 20 ms hops, lookahead 1
    assert 0 < r["latency"]["measured_worst_ms"] <= r["latency"]["computed_ms"]
    first = r["rows"][0]
    assert first["streams"] == 1 and first["blocks"] == 15
    assert first["p50_ms"] <= first["p95_ms"] <= first["p99_ms"] <= first["max_ms"]
    assert r["repeat"] == 3 and first["rtf_min"] <= first["rtf"] <= first["rtf_max"]
    assert r["machine"]["threads"] == 1 and r["machine"]["cpu"] and r["machine"]["matmul_gflops"] > 0
    assert r["max_streams_p99_under_hop"] in (0, 1, 2)


def test_bench_throughput_json(capsys, tiny_model_dir):
    r = run_json(capsys, "bench", "throughput", "--model", str(tiny_model_dir), "--seconds", "0.5", "--json")
    assert r["audio_s"] == pytest.approx(0.5) and r["x_real_time"] > 0 and r["peak_rss_mib"] > 0


def small_eval_folder(root: Path) -> Path:
    """One 1 s clip: hr/speech_a.flac (48 kHz) and lr/speech_a_8000.wav."""
    hr = signal.sosfilt(signal.butter(2, 3000, fs=48000, output="sos"), white(48000, 1.0))
    ev = root / "eval"
    (ev / "hr").mkdir(parents=True)
    (ev / "lr").mkdir()
    sf.write(ev / "hr" / "speech_a.flac", hr, 48000, subtype="PCM_24")
    sf.write(ev / "lr" / "speech_a_8000.wav", signal.resample_poly(hr, 1, 6), 8000, subtype="FLOAT")
    return ev


def test_bench_quality_on_a_small_eval_folder(capsys, tiny_model_dir, tmp_path):
    ev = small_eval_folder(tmp_path)
    r = run_json(capsys, "bench", "quality", "--eval", str(ev), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "out"), "--json")
    assert "visqol" not in r["rows"][0] and "mean_visqol" not in r  # only when asked: it is slow
    assert _passes(0) == "one pass" and _passes(1) == "1 step"  # a regression network has no steps
    assert [row["system"] for row in r["rows"]] == ["sinc", "naive (-12 dB/oct)", "tiny (2 steps)"]
    assert r["rows"][0]["lsd_vs_sinc"] == 1.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["naive-12-db-oct", "sinc", "tiny-2-steps"]
    assert sf.info(tmp_path / "out" / "tiny-2-steps" / "speech_a_8000.wav").samplerate == 48000
    assert main(["bench", "quality", "--eval", str(ev), "--model", str(tiny_model_dir)]) == 0  # the table too
    assert "| ViSQOL |" not in capsys.readouterr().out


def test_bench_quality_visqol(capsys, tiny_model_dir, tmp_path):
    """--visqol: a MOS-LQO per clip and per row, a mean per system, and a column in the table."""
    pytest.importorskip("visqol")
    ev = small_eval_folder(tmp_path)
    r = run_json(capsys, "bench", "quality", "--eval", str(ev), "--model", str(tiny_model_dir), "--visqol", "--json")
    assert all(1 <= row["visqol"] <= 5 for row in r["rows"] + r["per_clip"])
    assert r["mean_visqol"]["sinc"] == r["rows"][0]["visqol"]
    assert main(["bench", "quality", "--eval", str(ev), "--model", str(tiny_model_dir), "--visqol"]) == 0
    assert "| ViSQOL |" in capsys.readouterr().out


def test_bench_refuses_a_missing_model_or_folder(tmp_path):
    assert main(["bench", "throughput", "--model", str(tmp_path / "none")]) == 2
    assert main(["bench", "quality", "--eval", str(tmp_path), "--model", "basic"]) == 2


def test_compare_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    x = white(8000, 1.0)
    sf.write(tmp_path / "in.wav", x, 8000)
    sf.write(tmp_path / "out.wav", extend(x, 8000), 48000)
    sf.write(tmp_path / "ref.wav", extend(x, 8000, seed=1), 48000)
    png = tmp_path / "spec.png"
    assert main(["compare", str(tmp_path / "in.wav"), str(tmp_path / "out.wav"), "--ref", str(tmp_path / "ref.wav"),
                 "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "LSD" in capsys.readouterr().out


def test_compares_input_panel_is_what_rtsr_keeps_and_a_length_mismatch_is_warned(tmp_path, capsys, monkeypatch):
    """The input panel is rtsr's own resampling (scipy's left content above a 22.05 kHz input's
    Nyquist: -17 dB of white noise at 11.5-12.5 kHz); an output not of the input's length is named."""
    from rtsr import compare
    from rtsr.bench_quality import power_spec

    shown = {}
    monkeypatch.setattr(compare, "plot", lambda panels, *rest: shown.update(panels))
    sf.write(tmp_path / "in.wav", 3 * white(22050, 1.0), 22050, subtype="FLOAT")  # loud: over the scorer's floor
    sf.write(tmp_path / "out.wav", np.zeros(48000 + 4800), 48000)
    files = [str(tmp_path / name) for name in ("in.wav", "out.wav")]
    assert main(["compare", *files, "--plot", str(tmp_path / "p.png")]) == 0
    spec = power_spec(shown["input"])
    bins = np.fft.rfftfreq(2 * (spec.shape[0] - 1), 1 / 48000)
    above = 10 * np.log10(spec[bins > 11600].mean() / spec[(bins > 1000) & (bins < 10000)].mean())
    assert above < -90  # the scorer's floor
    assert "the output is 1.100 s, the input 1.000 s" in capsys.readouterr().err
