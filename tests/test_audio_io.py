"""Reading files in blocks gives exactly what one whole read gives, for every codec users have."""

import io

import numpy as np
import pytest
import soundfile as sf

from rtsr.audio_io import AudioReader, decode_audio
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
