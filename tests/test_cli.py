"""`rtsr upscale` end to end on short files and the tiny random model: lengths, channels, lag,
level, output naming, overwrite safety, and one clear failure line for every kind of bad input.

The random model's generated band is noise of its own level (about -30 dBFS), so level checks
look at the input's band, which the engine passes through; a trained model is not needed here.
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from rtsr.audio_io import AudioError, read_audio, write_audio
from rtsr.cli import main
from rtsr.resample import resample
from rtsr.upscaler import Upscaler

SR = 48000


def tone(sr: int, seconds: float = 0.25, channels: int = 1, amp: float = 0.1, seed: int = 0) -> np.ndarray:
    """White noise plus a tone, peak `amp`: (frames, channels) float32, different in every channel."""
    n = round(sr * seconds)
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None] / sr
    x = np.sin(2 * np.pi * 440 * (1 + np.arange(channels)) * t) + rng.standard_normal((n, channels))
    return (amp * x / np.abs(x).max()).astype(np.float32)


def put(path: Path, x: np.ndarray, sr: int, subtype: str = "FLOAT") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, sr, subtype=subtype)
    return path


def low_band(y: np.ndarray, sr: int, hz: float) -> np.ndarray:
    """Everything below hz (FFT mask): the part of the output that must be the input itself."""
    spec = np.fft.rfft(y, axis=0)
    spec[np.fft.rfftfreq(len(y), 1 / sr) >= hz] = 0
    return np.fft.irfft(spec, n=len(y), axis=0)


@pytest.fixture
def rtsr(capsys: pytest.CaptureFixture, tiny_model_dir: Path):
    """Run `rtsr upscale ARGS --model <tiny> --device cpu`; returns rc, stdout, stderr."""

    def run(*args: object) -> SimpleNamespace:
        rc = main(["upscale", *map(str, args), "--model", str(tiny_model_dir), "--device", "cpu"])
        out, err = capsys.readouterr()
        return SimpleNamespace(rc=rc, out=out, err=err)

    return run


# --- the signal: length, channels, the same samples as the API, zero lag, level ----------------

CASES = [(8000, 1), (44100, 2), (16000, 8)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}Hz-{c[1]}ch")
def upscaled(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One CLI run per case, shared by the tests below: (input, input rate, output as read back)."""
    sr, ch = request.param
    x = tone(sr, 0.25, ch, amp=0.01)
    src = put(tmp_path_factory.mktemp("in") / "x.wav", x, sr)
    assert main(["upscale", "-i", str(src), "--model", str(tiny_model_dir), "--device", "cpu", "-q"]) == 0
    y, sr_out = sf.read(src.with_name("x_48k.wav"), dtype="float32", always_2d=True)
    assert sr_out == SR
    return SimpleNamespace(x=x, sr=sr, y=y)


def test_exact_length_and_channels(upscaled: SimpleNamespace) -> None:
    assert upscaled.y.shape == (round(len(upscaled.x) * SR / upscaled.sr), upscaled.x.shape[1])


def test_output_is_the_api_output(upscaled: SimpleNamespace, tiny_model_dir: Path) -> None:
    """Float WAV stores the engine's samples bit for bit: the CLI adds nothing of its own."""
    expected = Upscaler.load(str(tiny_model_dir), "cpu", backend="auto").upscale(upscaled.x, upscaled.sr)
    np.testing.assert_array_equal(upscaled.y, expected)


def test_zero_lag(upscaled: SimpleNamespace) -> None:
    """The input's band in the output lines up with the input resampled: correlation peaks at lag 0.

    The band is kept well below the cutoff: the random model's loud generated band leaks a little
    below it through the STFT window.
    """
    band = 0.3 * upscaled.sr
    ref = low_band(resample(upscaled.x, upscaled.sr, SR), SR, band)
    out = low_band(upscaled.y, SR, band)
    lags = np.arange(-48, 49)
    for c in range(ref.shape[1]):
        corr = [np.dot(np.roll(out[:, c], -k), ref[:, c]) for k in lags]
        assert lags[int(np.argmax(corr))] == 0
        assert np.corrcoef(out[:, c], ref[:, c])[0, 1] > 0.99


def test_loudness_untouched(upscaled: SimpleNamespace) -> None:
    """A -40 dBFS input stays at -40 dBFS in its own band and is not lifted anywhere near full scale."""
    band = 0.3 * upscaled.sr
    rms_in = np.sqrt(np.mean(low_band(resample(upscaled.x, upscaled.sr, SR), SR, band) ** 2))
    rms_out = np.sqrt(np.mean(low_band(upscaled.y, SR, band) ** 2))
    assert rms_out == pytest.approx(rms_in, rel=0.02)
    assert np.abs(upscaled.y).max() < 0.5


# --- naming, formats, batches -------------------------------------------------------------------


def test_output_file_takes_format_from_suffix(rtsr, tmp_path: Path) -> None:
    src = put(tmp_path / "a.wav", tone(16000, 0.2), 16000)
    r = rtsr("-i", src, "--output", tmp_path / "out" / "custom.flac")
    assert r.rc == 0, r.err
    info = sf.info(tmp_path / "out" / "custom.flac")
    assert (info.format, info.subtype, info.samplerate, info.frames) == ("FLAC", "PCM_24", SR, 9600)


def test_output_file_needs_exactly_one_input(rtsr, tmp_path: Path) -> None:
    a, b = put(tmp_path / "a.wav", tone(16000, 0.2), 16000), put(tmp_path / "b.wav", tone(16000, 0.2), 16000)
    r = rtsr("-i", a, "-i", b, "--output", tmp_path / "o.wav")
    assert r.rc == 2 and "exactly one input" in r.err
    assert not (tmp_path / "o.wav").exists()


def test_inputs_named_without_an_option(rtsr, tmp_path: Path) -> None:
    """`rtsr upscale a.wav b.flac -o out`, as users type it; beside -i and lists, in that order."""
    a, b = put(tmp_path / "a.wav", tone(16000, 0.2), 16000), put(tmp_path / "b.flac", tone(8000, 0.2), 8000, "PCM_16")
    c = put(tmp_path / "c.wav", tone(22050, 0.2), 22050)
    r = rtsr(a, b, "-o", tmp_path / "out", "-i", c, "--json")
    assert r.rc == 0, r.err
    assert [f["input"] for f in json.loads(r.out)["results"]] == [str(a), str(b), str(c)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_48k.wav", "b_48k.wav", "c_48k.wav"]
    r = rtsr()
    assert r.rc == 2 and "no inputs: give FILE_OR_DIR" in r.err
    r = rtsr(c, "-o", tmp_path / "out2", a, "--json")  # an input after an option
    assert r.rc == 0, r.err
    assert [f["input"] for f in json.loads(r.out)["results"]] == [str(c), str(a)]
    r = rtsr(c, "-o", tmp_path / "out3", a, "--bogus")
    assert r.rc == 2 and "unrecognized arguments: --bogus" in r.err and not (tmp_path / "out3").exists()


def test_input_list(rtsr, tmp_path: Path) -> None:
    a = put(tmp_path / "lists" / "a.wav", tone(16000, 0.2), 16000)
    b = put(tmp_path / "elsewhere" / "b.wav", tone(8000, 0.2), 8000)
    lst = tmp_path / "lists" / "files.txt"
    lst.write_text(f"# two files\n\n{a.name}\n  {b}  \n")  # relative to the list's folder, and absolute
    r = rtsr("-il", lst, "-o", tmp_path / "out")
    assert r.rc == 0, r.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_48k.wav", "b_48k.wav"]
    assert "2 upscaled, 0 failed" in r.out
    r = rtsr("-il", tmp_path / "no-such-list.txt")
    assert r.rc == 2 and "cannot read input list" in r.err


def test_folder_glob_and_flac(rtsr, tmp_path: Path) -> None:
    """Recursive search, only matching names, subfolders mirrored; an input whose name merely ends
    in _48k is taken, an earlier output (NAME_48k beside NAME) is not, and the user is told."""
    put(tmp_path / "in" / "deep" / "a.flac", tone(22050, 0.2), 22050, "PCM_16")
    put(tmp_path / "in" / "b.wav", tone(22050, 0.2), 22050)
    put(tmp_path / "in" / "take_48k.flac", tone(22050, 0.2), 22050, "PCM_16")
    put(tmp_path / "in" / "deep" / "a_48k.flac", tone(48000, 0.2), 48000, "PCM_24")
    r = rtsr("-i", tmp_path / "in", "--glob", "*.flac", "--format", "flac", "-o", tmp_path / "out")
    assert r.rc == 0, r.err
    written = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == [Path("deep/a_48k.flac"), Path("take_48k_48k.flac")]
    assert "1 earlier output(s)" in r.err and "a_48k.flac" in r.err
    info = sf.info(tmp_path / "out" / "deep" / "a_48k.flac")
    assert (info.subtype, info.samplerate, info.frames) == ("PCM_24", SR, round(4410 * SR / 22050))


def test_a_second_run_next_to_the_inputs_takes_no_outputs_as_inputs(rtsr, tmp_path: Path) -> None:
    put(tmp_path / "in" / "a.wav", tone(16000, 0.2), 16000)
    assert rtsr("-i", tmp_path / "in").rc == 0
    r = rtsr("-i", tmp_path / "in")
    assert r.rc == 0 and "0 upscaled, 1 skipped, 0 failed" in r.out
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.wav", "a_48k.wav"]


def test_cutoff_is_passed_to_the_engine(rtsr, tmp_path: Path, tiny_model_dir: Path) -> None:
    x = tone(16000, 0.2)
    assert rtsr("-i", put(tmp_path / "a.wav", x, 16000), "--cutoff", "3000").rc == 0
    y, _ = sf.read(tmp_path / "a_48k.wav", dtype="float32")
    up = Upscaler.load(str(tiny_model_dir), "cpu", backend="auto")
    np.testing.assert_array_equal(y, up.upscale(x[:, 0], 16000, cutoff=3000.0))
    assert not np.array_equal(y, up.upscale(x[:, 0], 16000))  # so the cutoff did reach the engine
    for bad in ("abc", "0", "-5", "nan", "100", "30000"):
        r = rtsr("-i", tmp_path / "a.wav", "--cutoff", bad)
        assert r.rc == 2 and "--cutoff" in r.err


def test_cutoff_above_the_inputs_nyquist_fails_that_file(rtsr, tmp_path: Path) -> None:
    r = rtsr("-i", put(tmp_path / "a.wav", tone(16000, 0.2), 16000), "--cutoff", "9000")
    assert r.rc == 1 and "outside 1000..8000 Hz" in r.err and not (tmp_path / "a_48k.wav").exists()
    assert "Error" not in r.err  # in the user's words, not a class name ("ValueError: ...")


def test_empty_folder_is_one_failure(rtsr, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = rtsr("-i", tmp_path / "empty")
    assert r.rc == 1 and "folder has no audio files" in r.err


def test_existing_outputs_are_skipped_so_a_batch_resumes(rtsr, tmp_path: Path) -> None:
    """A finished file is counted as skipped (exit 0) and left alone; --overwrite redoes it."""
    src = put(tmp_path / "a.wav", tone(16000, 0.2), 16000)
    put(tmp_path / "b.wav", tone(16000, 0.2, seed=1), 16000)
    old = tmp_path / "a_48k.wav"
    old.write_bytes(b"precious")
    r = rtsr("-i", src, "-i", tmp_path / "b.wav", "--json")
    report = json.loads(r.out)
    assert r.rc == 0 and report["totals"]["skipped"] == 1 and report["totals"]["upscaled"] == 1
    assert [x["status"] for x in report["results"]] == ["skipped", "upscaled"]
    assert old.read_bytes() == b"precious"
    assert rtsr("-i", src, "--overwrite").rc == 0
    assert sf.info(old).frames == 9600


def test_inputs_sharing_a_name_get_outputs_of_their_own(rtsr, tmp_path: Path) -> None:
    """song.wav and song.flac would both make song_48k.wav: each gets its extension in the name."""
    put(tmp_path / "in" / "song.wav", tone(16000, 0.2), 16000)
    put(tmp_path / "in" / "song.flac", tone(16000, 0.2, seed=1), 16000, "PCM_16")
    r = rtsr("-i", tmp_path / "in", "-o", tmp_path / "out")
    assert r.rc == 0, r.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["song_flac_48k.wav", "song_wav_48k.wav"]


def test_inputs_that_still_share_an_output_are_refused_before_any_work(rtsr, tmp_path: Path) -> None:
    a = put(tmp_path / "one" / "x.wav", tone(16000, 0.2), 16000)
    b = put(tmp_path / "two" / "x.wav", tone(16000, 0.2, seed=1), 16000)
    r = rtsr("-i", a, "-i", b, "-o", tmp_path / "out")
    assert r.rc == 2 and "would both be written to" in r.err
    assert not (tmp_path / "out").exists()


def test_batch_goes_past_a_bad_file(rtsr, tmp_path: Path) -> None:
    put(tmp_path / "in" / "a.wav", tone(16000, 0.2), 16000)
    (tmp_path / "in" / "b.wav").write_bytes(os.urandom(2000))
    put(tmp_path / "in" / "c.wav", tone(8000, 0.2), 8000)
    r = rtsr("-i", tmp_path / "in", "-o", tmp_path / "out")
    assert r.rc == 1
    assert r.out.strip().splitlines()[-1] == "2 upscaled, 1 failed"
    assert r.err.count("FAILED") == 1 and "b.wav: not a readable audio file" in r.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_48k.wav", "c_48k.wav"]  # no temp files


def test_json_report(rtsr, tmp_path: Path) -> None:
    put(tmp_path / "a.wav", tone(16000, 0.2, channels=2), 16000)
    r = rtsr("-i", tmp_path / "a.wav", "-i", tmp_path / "missing.wav", "--json")
    assert r.rc == 1
    report = json.loads(r.out)
    ok, bad = report["results"]
    assert ok["status"] == "upscaled" and ok["sr_in"] == 16000 and ok["channels"] == 2
    assert ok["seconds"] == pytest.approx(0.2) and ok["compute_s"] > 0 and ok["error"] is None
    assert bad["status"] == "failed" and bad["error"] == "no such file"
    counts = {k: report["totals"][k] for k in ("files", "upscaled", "resampled", "failed")}
    assert counts == {"files": 2, "upscaled": 1, "resampled": 0, "failed": 1}


# --- awkward but valid inputs --------------------------------------------------------------------


@pytest.mark.parametrize("sr", [96000, 192000])
def test_high_rates_are_resampled_not_generated(rtsr, tmp_path: Path, sr: int) -> None:
    x = tone(sr, 0.2, channels=2)
    r = rtsr("-i", put(tmp_path / "hi.wav", x, sr))
    assert r.rc == 0 and "full band: resampled, nothing generated" in r.out
    assert "0 upscaled, 1 resampled, 0 failed" in r.out
    y, _ = sf.read(tmp_path / "hi_48k.wav", dtype="float32", always_2d=True)
    np.testing.assert_array_equal(y, resample(x, sr, SR))
    assert len(y) == round(len(x) * SR / sr)


@pytest.mark.parametrize("sr", [8000, 44100])
def test_one_sample(rtsr, tmp_path: Path, sr: int) -> None:
    r = rtsr("-i", put(tmp_path / "one.wav", np.full((1, 1), 0.5, np.float32), sr))
    assert r.rc == 0, r.err
    assert sf.info(tmp_path / "one_48k.wav").frames == round(SR / sr)


def test_digital_silence_in_is_zeros_out(rtsr, tmp_path: Path) -> None:
    """The model (this untrained one at about -30 dBFS, the shipped ones at about -113) would
    paint its own band over silence."""
    r = rtsr("-i", put(tmp_path / "s.wav", np.zeros((3200, 2), np.float32), 16000))
    assert r.rc == 0, r.err
    y, _ = sf.read(tmp_path / "s_48k.wav", dtype="float32")
    assert y.shape == (9600, 2) and not y.any()


def test_the_level_warning_flags_a_jump_but_not_a_silent_files_hiss() -> None:
    """A digitally silent file came out with "output is 102.9 dB louder than the input": the shipped
    model's band over silence is about -137 dBFS, nothing to warn of; an audible jump still is."""
    from rtsr.files import Level

    def warning(rms_in: float, rms_out: float) -> str | None:
        level = Level()
        level.input(np.full((1000, 2), rms_in, np.float32))
        level.output(np.full((3000, 2), rms_out, np.float32))
        return level.warning()

    assert warning(0.1, 0.1) is None and warning(0.1, 0.19) is None
    assert "20.0 dB louder" in warning(0.01, 0.1)
    assert warning(0.0, 1.4e-7) is None
    assert "60.0 dB louder" in warning(1e-6, 1e-3)


def test_full_scale_square_wave(rtsr, tmp_path: Path) -> None:
    """Float WAV keeps the resampler's overshoot past full scale; FLAC clips it and says how much."""
    t = np.arange(3200) / 16000
    src = put(tmp_path / "sq.wav", np.sign(np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    assert rtsr("-i", src).rc == 0
    y, _ = sf.read(tmp_path / "sq_48k.wav", dtype="float32")
    assert np.isfinite(y).all() and np.abs(y).max() > 1.0
    r = rtsr("-i", src, "--format", "flac")
    assert r.rc == 0 and "samples clipped to fit 24-bit flac" in r.out
    assert np.abs(sf.read(tmp_path / "sq_48k.flac")[0]).max() <= 1.0


def test_truncated_wav_gives_the_part_that_is_there(rtsr, tmp_path: Path) -> None:
    """libsndfile reads a WAV cut short as its complete frames, exactly; that prefix is upscaled."""
    x = tone(16000, 0.4, channels=2)
    data = put(tmp_path / "full.wav", x, 16000).read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    head, _ = read_audio(cut)
    assert 0 < len(head) < len(x)
    np.testing.assert_array_equal(head, x[: len(head)])
    assert rtsr("-i", cut).rc == 0
    assert sf.info(tmp_path / "cut_48k.wav").frames == round(len(head) * SR / 16000)


# --- bad inputs: one clear line each, nothing written ----------------------------------------------


def _nan_wav(path: Path) -> None:
    x = tone(16000, 0.2)
    x[100, 0] = np.nan
    put(path, x, 16000)


def _inf_wav(path: Path) -> None:
    x = tone(16000, 0.2)
    x[5, 0] = -np.inf
    put(path, x, 16000)


def _truncated_flac(path: Path) -> None:
    data = put(path.with_suffix(".flac"), tone(16000, 0.4), 16000, "PCM_16").read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD = {
    "missing": (lambda p: None, "no such file"),
    "not audio": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)), "not a readable audio file"),
    "empty": (lambda p: put(p, np.zeros((0, 1), np.float32), 16000), "empty (0 audio frames)"),
    "rate too low": (lambda p: put(p, tone(4000, 0.2), 4000), "sample rate 4000 Hz is outside 8000..384000"),
    "nan": (_nan_wav, "1 NaN/Inf samples"),
    "inf": (_inf_wav, "1 NaN/Inf samples"),
    "truncated flac": (_truncated_flac, "corrupt or truncated audio"),
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_fails_clearly(rtsr, tmp_path: Path, kind: str) -> None:
    make, message = BAD[kind]
    src = tmp_path / "bad.wav"
    make(src)
    r = rtsr("-i", src)
    assert r.rc == 1
    failure = [line for line in r.err.splitlines() if line.startswith("FAILED")]
    assert len(failure) == 1 and failure[0].startswith(f"FAILED {src}: ") and message in failure[0]
    assert "Traceback" not in r.err
    assert not (tmp_path / "bad_48k.wav").exists()


# --- model and writer ------------------------------------------------------------------------------


def test_unknown_model(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    src = put(tmp_path / "a.wav", tone(16000, 0.2), 16000)
    assert main(["upscale", "-i", str(src), "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    assert main(["upscale", "-i", str(src), "--model", str(tmp_path / "half")]) == 2
    assert "no trained model installed at" in capsys.readouterr().err
    assert not (tmp_path / "a_48k.wav").exists()


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    """FLAC holds at most 8 channels: the write fails, and neither the file nor its temp remains."""
    with pytest.raises(AudioError, match="cannot write flac"):
        write_audio(tmp_path / "nine.flac", np.zeros((100, 9), np.float32), SR, "flac")
    assert list(tmp_path.iterdir()) == []


def test_console_script() -> None:
    exe = shutil.which("rtsr")
    assert exe, "the rtsr console script is not installed"
    r = subprocess.run([exe, "upscale", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--output FILE" in r.stdout


def test_an_unwritable_destination_fails_before_any_compute(rtsr, tmp_path: Path, monkeypatch) -> None:
    """Checked first, named plainly (not a hidden temp file), and the model never runs."""
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    calls = []
    monkeypatch.setattr(Upscaler, "upscale_blocks", lambda *a, **k: calls.append(a) or iter(()))
    r = rtsr("-i", put(tmp_path / "a.wav", tone(16000, 0.2), 16000), "-o", tmp_path / "blocker" / "out")
    assert r.rc == 1 and "blocker is a file" in r.err and ".tmp" not in r.err and not calls
    monkeypatch.setattr("rtsr.files.os.access", lambda *a: False)  # what a read-only folder looks like
    r = rtsr("-i", tmp_path / "a.wav", "-o", tmp_path / "ro")
    assert r.rc == 1 and "no permission" in r.err and not calls


def test_a_transposed_array_is_refused_with_a_hint(tiny_model_dir: Path) -> None:
    up = Upscaler.load(str(tiny_model_dir))
    with pytest.raises(ValueError, match="transposed"):
        up.upscale(np.zeros((2, 44100), np.float32), 44100)


def test_a_lossy_files_codec_holes_are_filled_unless_kept(rtsr, tmp_path: Path, tiny_model_dir: Path) -> None:
    """An MP3's holes are filled (said in the report and --json); --keep-holes, or the same samples
    in a WAV, keep them: that output is the plain upscale."""
    src = tmp_path / "a.mp3"
    sf.write(src, tone(44100, 0.5), 44100, format="MP3", subtype="MPEG_LAYER_III", compression_level=0.9)
    x, _ = sf.read(src, dtype="float32", always_2d=True)
    put(tmp_path / "b.wav", x, 44100)
    r = rtsr("-i", src, "-o", tmp_path / "filled")
    assert r.rc == 0 and "lossy input: its codec's holes below the band filled" in r.out
    r = rtsr("-i", src, "-i", tmp_path / "b.wav", "-o", tmp_path / "kept", "--keep-holes", "--json")
    assert [res["holes_filled"] for res in json.loads(r.out)["results"]] == [False, False]
    r = rtsr("-i", tmp_path / "b.wav", "-o", tmp_path / "wav", "--json")
    assert json.loads(r.out)["results"][0]["holes_filled"] is False
    filled, kept, wav = (sf.read(tmp_path / d / f"{n}_48k.wav", dtype="float32")[0]
                         for d, n in (("filled", "a"), ("kept", "a"), ("wav", "b")))
    up = Upscaler.load(str(tiny_model_dir), "cpu", backend="auto")
    np.testing.assert_array_equal(filled, up.upscale(x[:, 0], 44100, fill_holes=True))
    np.testing.assert_array_equal(kept, wav)
    assert not np.array_equal(filled, kept)


def test_a_file_gives_the_same_bits_alone_and_third_in_a_list(rtsr, tmp_path: Path) -> None:
    """Two 10 s files first are 40 hops of one shape: enough, before, for the ONNX backend to make
    a fixed-shape session, which computes ~1e-5 apart; a file's output must not depend on that."""
    files = [put(tmp_path / f"in{k}.wav", tone(16000, 10.0 if k < 2 else 2.0, seed=k), 16000) for k in range(3)]
    assert rtsr("-i", files[2], "--output", tmp_path / "alone.wav").rc == 0
    (tmp_path / "list.txt").write_text("\n".join(f.name for f in files))
    assert rtsr("-il", tmp_path / "list.txt", "-o", tmp_path / "batch").rc == 0
    alone, third = read_audio(tmp_path / "alone.wav")[0], read_audio(tmp_path / "batch" / "in2_48k.wav")[0]
    assert np.array_equal(alone, third)


@pytest.mark.parametrize("name", ["talk.m4a", "clip.mp4"])
def test_aac_and_a_videos_sound_are_upscaled_with_their_band_found(rtsr, tmp_path: Path, name: str) -> None:
    """FFmpeg decodes what libsndfile cannot; AAC is lossy (holes filled) and its encoder's
    low-pass is the band found; the output has the source's exact length."""
    from test_audio_io import encode_with_ffmpeg

    from rtsr.bench_band import music_like

    x = 0.3 * np.stack([music_like(44100, 2.0, np.random.default_rng(k)) for k in range(2)], axis=1)
    src = encode_with_ffmpeg(tmp_path / name, x.astype(np.float32), 44100, "aac", 64000)
    r = rtsr("-i", src, "-o", tmp_path / "out", "--json")
    assert r.rc == 0, r.err
    res = json.loads(r.out)["results"][0]
    assert res["band"] == "detected" and 8000 < res["cutoff_hz"] < 20000 and res["holes_filled"]
    y, sr = read_audio(res["output"])
    assert (sr, y.shape) == (SR, (round(len(x) * SR / 44100), 2))


def test_a_pipeline_reads_standard_input_and_writes_standard_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`cat in.wav | rtsr upscale -i - --output out.wav`, and `--output -` for WAV on standard
    output (the report then on standard error)."""
    src = put(tmp_path / "in.wav", tone(16000, 0.5), 16000)
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    to_file = subprocess.run(["rtsr", "upscale", "-i", "-", "--output", str(tmp_path / "out.wav"), *model],
                             stdin=src.open("rb"), capture_output=True, timeout=120)
    assert to_file.returncode == 0, to_file.stderr.decode()
    piped = subprocess.run(["rtsr", "upscale", "-i", "-", "--output", "-", *model], stdin=src.open("rb"),
                           capture_output=True, timeout=120)
    assert piped.returncode == 0 and b"1 upscaled" in piped.stderr, piped.stderr.decode()
    y, sr = sf.read(io.BytesIO(piped.stdout), dtype="float32", always_2d=True)
    assert sr == SR and np.array_equal(y, read_audio(tmp_path / "out.wav")[0]) and len(y) == 24000


def test_a_terminal_is_no_standard_input_or_output_for_audio(rtsr, monkeypatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    r = rtsr("-i", "-", "--output", "x.wav")
    assert r.rc == 2 and "standard input, which is a terminal here" in r.err
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert rtsr("-i", "x.wav", "--output", "-").rc == 2


def test_standard_input_needs_an_output_named(rtsr) -> None:
    r = rtsr("-i", "-", "-o", "out")
    assert r.rc == 2 and "-i - (standard input) needs --output" in r.err


def test_an_output_naming_its_input_is_refused(rtsr, tmp_path: Path) -> None:
    src = put(tmp_path / "in.wav", tone(16000), 16000)
    r = rtsr("-i", src, "--output", tmp_path / "." / "in.wav", "--overwrite")
    assert r.rc == 2 and "is the input itself" in r.err
    assert read_audio(src)[1] == 16000  # untouched


# --- start-up: help, version, argument errors and thin commands load no torch ------------------


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["upscale", "--threads", "0", "-i", "x.wav"],
                                  ["upscale", "--help"], ["broker", "--help"], ["filter", "--help"],
                                  ["keygen", "--help"]])
def test_help_version_argument_errors_and_thin_commands_import_no_torch(argv: list[str]) -> None:
    script = f"import sys\nfrom rtsr.cli import main\nrc = main({argv!r})\nprint(rc, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    rc, torch_loaded = done.stdout.split()[-2:]
    assert torch_loaded == "False", argv
    assert rc == ("2" if "0" in argv else "0")


def test_argument_errors_say_what_was_wrong_in_the_users_words(rtsr) -> None:
    for args, words in ((["--steps", "x"], "argument --steps: expected a positive whole number, got 'x'"),
                        (["--threads", "0"], "argument --threads: expected a positive whole number, got '0'"),
                        (["--scheduler", "local:0"], "local:N needs N, the worker processes to start, at least 1")):
        r = rtsr("-i", "x.wav", *args)
        assert r.rc == 2 and words in r.err and "_positive_int" not in r.err, r.err


def test_every_commands_line_in_help_is_its_own_and_backends_are_the_engines() -> None:
    from rtsr.backends import BACKENDS
    from rtsr.cli import BACKEND_NAMES, COMMANDS, build_parser

    assert BACKEND_NAMES == BACKENDS
    for name, (_, line) in COMMANDS.items():
        listed = build_parser(name)._subparsers._group_actions[0]._choices_actions
        assert [a.help for a in listed if a.dest == name] == [line], name


def test_workers_split_a_file_over_threads_and_give_the_same_bits(rtsr, tmp_path: Path) -> None:
    """--workers 2 cuts each signal into two segments run side by side: the output is one stream's."""
    src = put(tmp_path / "in.wav", tone(16000, 6.0, seed=4), 16000)
    assert rtsr("-i", src, "--output", tmp_path / "one.wav").rc == 0
    assert rtsr("-i", src, "--output", tmp_path / "two.wav", "--workers", "2").rc == 0
    assert np.array_equal(read_audio(tmp_path / "one.wav")[0], read_audio(tmp_path / "two.wav")[0])
    assert rtsr("-i", src, "--output", tmp_path / "zero.wav", "--workers", "0").rc == 2


def test_workers_default_to_the_cores_here_and_to_one_on_a_cluster() -> None:
    """Offline segments use the machine's cores unless told; a Dask worker runs one file per
    process already, so there the default is one thread."""
    import argparse

    from rtsr.files import LoadOptions, offline_workers

    args = argparse.Namespace(model="basic", device="cpu", steps=None, seed=0, backend="auto", threads=1,
                              workers=None, scheduler=None)
    assert LoadOptions.of(args).workers == offline_workers() >= 1
    assert LoadOptions.of(argparse.Namespace(**{**vars(args), "scheduler": "local:2"})).workers == 1
    assert LoadOptions.of(argparse.Namespace(**{**vars(args), "workers": 3})).workers == 3


@pytest.mark.parametrize("command", [["upscale"], ["serve"], ["bench", "latency"], ["live"]])
def test_every_device_option_takes_one_gpu_of_several(command: list[str], capsys: pytest.CaptureFixture) -> None:
    """--device cuda:N (a server per GPU behind a broker) is a device name to every command;
    anything else is refused by the parser, in words."""
    assert main([*command, "--device", "cuda:1", "--help"]) == 0
    capsys.readouterr()
    assert main([*command, "--device", "gpu", "--help"]) == 2
    assert "argument --device: 'gpu': use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
