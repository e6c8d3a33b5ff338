"""What a file batch's I/O thread does (rtsr.file_batch): decode an input and find its band from
those same samples, and encode and write an output; each failure as the file's reason, in words."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtsr.audio_io import AudioError, decode_audio, readable, write_audio
from rtsr.cutoff import Band, as_band, scan_band


@dataclass
class Decoded:
    """An input decoded whole, with its band (found from these samples unless given), or the
    reason it cannot be upscaled (`error`, the samples then None)."""

    x: np.ndarray | None = None
    sr: int = 0
    lossy: bool = False
    band: Band | None = None
    error: str | None = None


def decode_with_band(src: Path, cutoff_hz: float | None) -> Decoded:
    """Decode `src` and find its band: what `rtsr upscale` reads once per file."""
    try:
        x, sr, lossy = decode_audio(readable(src), src)
        return Decoded(x, sr, lossy, as_band(cutoff_hz, sr) or scan_band(x, sr))
    except AudioError as e:
        return Decoded(error=e.reason if e.path == src else str(e))
    except (ValueError, MemoryError) as e:  # a cutoff above the input's Nyquist, a file too big to hold
        return Decoded(error=str(e) or type(e).__name__)


def write_output(dest: Path, y: np.ndarray, sr: int, fmt: str, overwrite: bool) -> tuple[int, str | None]:
    """Write an output atomically (rtsr.audio_io.write_audio): (samples clipped, error or None)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return write_audio(dest, y, sr, fmt, overwrite), None
    except (AudioError, OSError) as e:
        return 0, str(e)
