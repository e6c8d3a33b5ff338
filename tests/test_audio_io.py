"""Reading files in blocks gives exactly what one whole read gives, for every codec users have;
what libsndfile cannot read (AAC, ALAC, a video's sound) FFmpeg decodes, at the source's length."""

import fractions
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rtsr.audio_io import AudioError, AudioReader, decode_audio, read_audio
from rtsr.av_decode import duration_s
from rtsr.bench_band import music_like


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("fmt,subtype,sr", [("MP3", "MPEG_LAYER_III", 44100), ("OGG", "VORBIS", 48000),
                                            ("FLAC", "PCM_16", 44100)])
def test_blocks_equal_a_whole_read(tmp_path, fmt, subtype, sr, channels):
    """libsndfile's MPEG decoder corrupts ~1,550 samples after each read boundary (measured up to 0.6
    in 4096-frame reads of mono VBR files); the reader must not pass that on."""
    x = 0.5 * music_like(sr, 3.0, np.random.default_rng(0))
    path = tmp_path / f"clip.{fmt.lower()}"
    x = np.stack([x, x[::-1]], axis=1)[:, :channels]
    sf.write(path, x.astype(np.float32), sr, format=fmt, subtype=subtype, compression_level=0.6)
    whole, _ = sf.read(path, dtype="float32", always_2d=True)
    reader = AudioReader(path)
    for block in (4096, 1 << 18):
        got = np.concatenate(list(reader.blocks(block)))
        assert got.shape == whole.shape and np.array_equal(got, whole), (fmt, block)


@pytest.mark.parametrize("fmt,subtype,lossy", [("MP3", "MPEG_LAYER_III", True), ("OGG", "VORBIS", True),
                                               ("OGG", "OPUS", True), ("FLAC", "PCM_16", False),
                                               ("WAV", "FLOAT", False)])
def test_lossy_codecs_are_known(tmp_path, fmt, subtype, lossy):
    """Files from transform codecs (their holes are filled), whichever way they are read."""
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, 0.3 * music_like(48000, 0.5, np.random.default_rng(0)), 48000, format=fmt, subtype=subtype)
    assert AudioReader(path).lossy is lossy
    assert decode_audio(io.BytesIO(path.read_bytes()), path.name)[2] is lossy


def encode_with_ffmpeg(path: Path, x: np.ndarray, sr: int, codec: str = "aac", bit_rate: int = 64000) -> Path:
    """Encode (frames, channels) float32 with FFmpeg (PyAV), container from the suffix."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=sr, layout="mono" if x.shape[1] == 1 else "stereo")
        if bit_rate:
            stream.bit_rate = bit_rate
        for i in range(0, len(x), 4096):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[i:i + 4096]).reshape(1, -1), format="flt",
                                               layout=stream.layout.name)
            frame.sample_rate, frame.pts, frame.time_base = sr, i, fractions.Fraction(1, sr)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


FFMPEG_CASES = [("clip.m4a", "aac", 44100, True), ("clip.mp4", "aac", 48000, True), ("clip.mkv", "aac", 32000, True),
                ("clip.webm", "libopus", 48000, True), ("alac.m4a", "alac", 44100, False)]


@pytest.mark.parametrize("name,codec,sr,lossy", FFMPEG_CASES)
def test_what_libsndfile_cannot_read_ffmpeg_decodes(tmp_path, name, codec, sr, lossy):
    """AAC in M4A, MP4 and MKV, Opus in WebM, ALAC: the source's samples, aligned (no encoder
    priming left at the start), at its length where the container states it, lossy as coded."""
    x = 0.3 * np.stack([music_like(sr, 1.5, np.random.default_rng(k)) for k in range(2)], axis=1)
    path = encode_with_ffmpeg(tmp_path / name, x.astype(np.float32), sr, codec, 0 if codec == "alac" else 128000)
    with pytest.raises(sf.LibsndfileError):
        sf.info(path)
    reader = AudioReader(path)
    got = np.concatenate(list(reader.blocks(4096)))
    assert (reader.sr, reader.channels, reader.lossy) == (sr, 2, lossy)
    if name.endswith((".m4a", ".mp4", ".webm")):
        assert reader.frames == len(got) == len(x)
    n, reach = min(len(x), len(got)), 64
    match = [float(np.sum(got[reach + lag:n - reach + lag] * x[reach:n - reach])) for lag in range(-reach, reach + 1)]
    assert np.argmax(match) == reach  # aligned: the best match is at lag 0
    if not lossy:
        np.testing.assert_allclose(got[:n], x[:n], atol=1e-5)
    assert duration_s(path) == pytest.approx(len(x) / sr, abs=0.05)  # for the progress bar, from the header
    whole, sr_, lossy_ = decode_audio(io.BytesIO(path.read_bytes()), name)  # bytes sent to a worker
    assert (sr_, lossy_) == (sr, lossy) and np.array_equal(whole, got)


def test_what_neither_reads_is_refused_in_libsndfiles_words(tmp_path):
    path = tmp_path / "notes.m4a"
    path.write_text("not audio")
    with pytest.raises(AudioError, match="not a readable audio file"):
        AudioReader(path)


def test_a_file_that_is_there_is_not_called_missing(tmp_path):
    path = tmp_path / "notes.mp3"  # libsndfile's MPEG reader says "File does not exist ..." of it
    path.write_text("hello")
    with pytest.raises(AudioError, match="not a readable audio file") as refused:
        read_audio(path)
    assert "does not exist" not in str(refused.value) and "Invalid data" in str(refused.value)
