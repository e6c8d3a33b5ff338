"""`rtsr upscale` on many files (rtsr.file_batch): decoded and written on I/O threads,
upscaled together, each output the one the file gets alone; a bad file fails alone."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rtsr import file_batch
from rtsr.audio_io import read_audio
from rtsr.cli import main
from rtsr.upscaler import Upscaler


def noise(sr: int, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((round(sr * seconds), channels))).astype(np.float32)


@pytest.mark.parametrize(("batch_s", "io_threads"), [(file_batch.BATCH_S, 1), (1.0, 1), (1.0, 3)])
def test_files_in_batches_are_upscaled_as_alone_and_a_bad_one_fails_alone(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        batch_s: float, io_threads: int) -> None:
    """One batch or a batch per file, decoded and written by one I/O thread or three (a many-core
    machine's: files decoded out of order, each result still in its place)."""
    monkeypatch.setattr(file_batch, "BATCH_S", batch_s)
    monkeypatch.setattr(file_batch, "io_threads", lambda: io_threads)
    inputs = {"a.wav": (noise(16000, 1.3), 16000), "b.flac": (noise(44100, 0.7, 2, seed=1), 44100),
              "c.wav": (noise(8000, 2.1, seed=2), 8000)}
    for name, (x, sr) in inputs.items():
        sf.write(tmp_path / name, x, sr)
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    (tmp_path / "list.txt").write_text("a.wav\nbad.wav\nb.flac\nc.wav\n")
    rc = main(["upscale", "-il", str(tmp_path / "list.txt"), "-o", str(tmp_path / "out"), "--json",
               "--model", str(tiny_model_dir), "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and [r["status"] for r in report["results"]] == ["upscaled", "failed", "upscaled", "upscaled"]
    up = Upscaler.load(str(tiny_model_dir))
    for name, (_, sr) in inputs.items():
        x = read_audio(tmp_path / name)[0]
        y = read_audio(tmp_path / "out" / f"{Path(name).stem}_48k.wav")[0]
        assert np.array_equal(y, up.upscale(x, sr).astype(np.float32)), name
