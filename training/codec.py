"""Real codec inputs for training: crops encoded and decoded by the encoders users' files come from
(LAME MP3 at 44.1 kHz and libvorbis at 48 kHz, through libsndfile), each declared at the band the
runtime detector finds in it.

Why: below its edge an MP3 is full of holes (LAME zeroes whole scale-factor bands where bits run
short), which a model trained only on clean low-passes reads as a weak top band: on a 16 kHz speech
MP3 the shipped model put 16.5-18 kHz 1.5-2 decades under the source, against 1 decade for the same
clip low-passed cleanly at 16 kHz. Encoding is too slow to do per batch (a 1.5 s crop costs about as
much as a training step), so a fixed pool of pairs is made once and mixed into every batch.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch

from rtsr.cutoff import band_of_48k
from rtsr.features import SR
from rtsr.resample import resample


class Codec(NamedTuple):
    format: str
    subtype: str
    rate: int
    levels: tuple[float, float]  # libsndfile compression_level range: 0 best, 1 smallest


# MP3 from ~320 kbps down to LAME's lowest quality (edges ~7-20 kHz); Vorbis from its middle quality
# down (edges ~11-20 kHz; above that libvorbis keeps the full band and there is nothing to learn).
# libsndfile refuses LAME's level from about 0.99998 up (measured: 1.0 and 0.99998 refused, 0.9999
# taken), which a uniform draw over (0.3, 1.0) hit once in a few thousand pairs and ended the run.
CODECS = (Codec("MP3", "MPEG_LAYER_III", 44100, (0.3, 0.999)), Codec("OGG", "VORBIS", 48000, (0.5, 1.0)))


def encode_decode(x48: np.ndarray, codec: Codec, level: float) -> np.ndarray:
    """A 48 kHz mono signal through the codec at its rate and back to 48 kHz, same length, no lag
    (libsndfile trims the encoder's delay; both legs use the engine's own zero-lag resampler)."""
    x = x48 if codec.rate == SR else resample(x48, SR, codec.rate)
    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0), codec.rate, format=codec.format, subtype=codec.subtype,
             compression_level=level)
    buf.seek(0)
    y = sf.read(buf, dtype="float32")[0]
    y = y if codec.rate == SR else resample(y, codec.rate, SR)
    return np.pad(y, (0, max(0, len(x48) - len(y))))[:len(x48)]


class CodecPairs(NamedTuple):
    """Targets (N, samples), their codec-decoded inputs, the detected edges (Hz) and the targets' bands."""

    hr: torch.Tensor
    lr: torch.Tensor
    cutoff: torch.Tensor
    band: torch.Tensor

    @staticmethod
    def make(crops: torch.Tensor, bands: torch.Tensor, max_ratio: float, seed: int) -> CodecPairs:
        """Encode each crop with a random codec and level; keep those whose detected edge lies at or
        under max_ratio x the target's own band (above it the target holds no ground truth), the
        same rule as the simulated degradations."""
        rng = np.random.default_rng(seed)
        keep: list[tuple[torch.Tensor, np.ndarray, float, float]] = []
        for x, b in zip(crops.cpu(), bands.cpu().tolist(), strict=True):
            codec = CODECS[rng.integers(len(CODECS))]
            y = encode_decode(x.numpy(), codec, float(rng.uniform(*codec.levels)))
            edge = band_of_48k([y[:, None]], 1, codec.rate)
            if edge.source == "detected" and edge.hz <= max_ratio * b:
                keep.append((x, y, edge.hz, b))
        if not keep:
            raise ValueError("no codec pair had a detectable edge under its target's band")
        dev = crops.device
        return CodecPairs(torch.stack([k[0] for k in keep]).to(dev),
                          torch.from_numpy(np.stack([k[1] for k in keep])).to(dev),
                          torch.tensor([k[2] for k in keep], dtype=torch.float32, device=dev),
                          torch.tensor([k[3] for k in keep], dtype=torch.float32, device=dev))

    def draw(self, k: int, gen: torch.Generator) -> CodecPairs:
        idx = torch.randint(0, len(self.hr), (k,), generator=gen).to(self.hr.device)
        return CodecPairs(*(t[idx] for t in self))
