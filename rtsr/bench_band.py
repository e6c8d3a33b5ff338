"""`rtsr bench band`: does the band-edge detector find real low-pass edges, and only those?

A labelled bank made on the spot: material (generated speech-, music- and effects-like signals,
mono and stereo, or the references of an eval folder) through what users' audio went through —
LAME MP3, Vorbis and Opus written by libsndfile, resamplers (polyphase, FFT), IIR low-passes of
several families and orders, a phone channel — each with its true edge, plus the untouched full
band, which must not be given an edge. A codec's edge is measured once on white noise through the
same encoder and setting (a flat spectrum shows the encoder's low-pass unambiguously).

    rtsr bench band                       # generated material
    rtsr bench band --eval ../shared/eval-dev   # the eval folder's references as material
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from rtsr.cutoff import MAX_EDGE_HZ, scan_band
from rtsr.report import markdown_table

TOLERANCE_HZ = 500.0  # a hit: within this of the true edge


@dataclass
class Case:
    material: str
    degradation: str
    x: np.ndarray  # (frames, channels)
    sr: int
    edge_hz: float | None  # None: full band, no edge to find


# --- material -------------------------------------------------------------------------------------


def speech_like(sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Voiced syllables (gliding pitch, harmonics falling 12 dB/octave above 1 kHz) and fricative
    noise bursts: weak highs that still reach the Nyquist."""
    t = np.arange(round(sr * seconds)) / sr
    f0 = rng.uniform(100, 220) * (1 + 0.2 * np.sin(2 * np.pi * 0.4 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k ** 1.5 for k in range(1, 40))
    syllables = np.sin(2 * np.pi * 3 * t) ** 2
    fricative = signal.lfilter([1, -0.95], [1], rng.standard_normal(len(t))) * (np.sin(2 * np.pi * 1.5 * t) > 0.9)
    return 0.2 * syllables * voice + 0.03 * fricative


def music_like(sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Sawtooth-like chords (harmonics 1/k, up to the Nyquist) and decaying noise hits."""
    n = round(sr * seconds)
    t = np.arange(n) / sr
    y = np.zeros(n)
    for f in rng.uniform(110, 880, 4):
        k = np.arange(1, int(sr / 2 / f))
        y += (np.sin(2 * np.pi * np.outer(t, f * k)) / k).sum(axis=1) * 0.05
    hits = np.zeros(n)
    hits[rng.integers(0, n, 8)] = 1.0
    decay = np.exp(-np.arange(int(0.15 * sr)) / (0.03 * sr))
    return y + 0.3 * np.convolve(hits, decay)[:n] * rng.standard_normal(n)


def effects_like(sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Band-swept noise and a chirp: effects' broad, moving spectra."""
    n = round(sr * seconds)
    t = np.arange(n) / sr
    chirp = signal.chirp(t, 200, seconds, 0.45 * sr, method="logarithmic")
    noise = signal.lfilter([1], [1, -0.7], rng.standard_normal(n)) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t))
    return 0.2 * chirp + 0.1 * noise


GENERATORS: dict[str, Callable[[int, float, np.random.Generator], np.ndarray]] = {
    "speech": speech_like, "music": music_like, "effects": effects_like}


def generated(seconds: float = 3.0, seed: int = 0) -> Iterator[tuple[str, np.ndarray, int]]:
    """(name, (frames, channels) at 48 kHz, 48000): each kind mono, and music in stereo."""
    rng = np.random.default_rng(seed)
    for kind, gen in GENERATORS.items():
        x = gen(48000, seconds, rng)[:, None]
        yield kind, 0.5 * x / np.abs(x).max(), 48000
    stereo = np.stack([music_like(48000, seconds, rng), music_like(48000, seconds, rng)], axis=1)
    yield "music-stereo", 0.5 * stereo / np.abs(stereo).max(), 48000


def eval_references(folder: Path) -> Iterator[tuple[str, np.ndarray, int]]:
    for path in sorted((folder / "hr").glob("*.flac")):
        x, sr = sf.read(path, dtype="float64", always_2d=True)
        yield path.stem, 0.7 * x / max(np.abs(x).max(), 1e-9), sr


# --- degradations -----------------------------------------------------------------------------------


def _resample(x: np.ndarray, sr_from: int, sr_to: int, kind: str = "poly") -> np.ndarray:
    if kind == "fft":
        return signal.resample(x, round(len(x) * sr_to / sr_from), axis=0)
    g = np.gcd(sr_from, sr_to)
    return signal.resample_poly(x, sr_to // g, sr_from // g, axis=0)


CODECS = {  # name -> (rate, soundfile format, subtype, compression level)
    "mp3-v9": (44100, "MP3", "MPEG_LAYER_III", 0.9),
    "mp3-v6": (44100, "MP3", "MPEG_LAYER_III", 0.6),
    "mp3-v3": (44100, "MP3", "MPEG_LAYER_III", 0.3),
    "vorbis-q0": (48000, "OGG", "VORBIS", 1.0),
    "vorbis-q3": (48000, "OGG", "VORBIS", 0.7),
    "opus-low": (48000, "OGG", "OPUS", 0.95),
    "opus-mid": (48000, "OGG", "OPUS", 0.8),
}


def encode(x: np.ndarray, codec: str) -> tuple[np.ndarray, int]:
    """x at the codec's rate through a real encoder and back (libsndfile: LAME, libvorbis, libopus)."""
    sr, fmt, subtype, level = CODECS[codec]
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format=fmt, subtype=subtype, compression_level=level)
    buf.seek(0)
    y, _ = sf.read(buf, dtype="float32", always_2d=True)
    return y, sr


@cache
def codec_edge(codec: str) -> float | None:
    """The encoder's low-pass for this setting, read off white noise: the highest frequency whose
    long-term level is within 20 dB of the median level over 1-5 kHz (None: a full band)."""
    sr = CODECS[codec][0]
    noise = 0.1 * np.random.default_rng(1).standard_normal((3 * sr, 1))
    y, _ = encode(noise, codec)
    f, p = signal.welch(y[:, 0], sr, nperseg=4096)
    level = 10 * np.log10(p + 1e-30)
    ref = np.median(level[(f > 1000) & (f < 5000)])
    edge = float(f[np.nonzero(level >= ref - 20)[0][-1]])
    return None if edge > MAX_EDGE_HZ else edge


Degraded = tuple[str, np.ndarray, int, float | None]


def degradations(x: np.ndarray, sr: int, rng: np.random.Generator) -> Iterator[Degraded]:
    """(name, audio, rate, true edge) for one piece of 48 kHz (or 44.1 kHz+) material."""
    x44 = _resample(x, sr, 44100)
    x48 = _resample(x, sr, 48000)
    yield "full band 48k", x48, 48000, None
    yield "full band 44.1k", x44, 44100, None
    for codec, (rate, *_rest) in CODECS.items():
        y, r = encode(x44 if rate == 44100 else x48, codec)
        yield codec, y, r, codec_edge(codec)
    for low in (8000, 11025, 16000, 22050, 32000):
        yield f"poly {low} in 48k", _resample(_resample(x48, 48000, low), low, 48000), 48000, low / 2
    yield "fft 16000 in 44.1k", _resample(_resample(x44, 44100, 16000, "fft"), 16000, 44100, "fft"), 44100, 8000.0
    for family in ("cheby1", "butter", "ellip"):
        edge = float(rng.uniform(3000, 16000))
        order = int(rng.integers(8, 11))  # lower orders roll off like content: not looked for
        if family == "cheby1":
            sos = signal.cheby1(order, 0.5, edge, fs=48000, output="sos")
        elif family == "ellip":
            sos = signal.ellip(order, 0.5, 80, edge, fs=48000, output="sos")
        else:
            sos = signal.butter(order, edge, fs=48000, output="sos")
        y = signal.sosfilt(sos, x48, axis=0)
        yield f"{family} order {order}", y, 48000, edge
    phone = signal.sosfilt(signal.butter(4, [300, 3400], btype="band", fs=8000, output="sos"),
                           _resample(x48, 48000, 8000), axis=0)
    yield "phone in 48k", _resample(phone, 8000, 48000), 48000, 3400.0


def bank(material: Iterator[tuple[str, np.ndarray, int]], seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    return [Case(name, deg, y.astype(np.float32), r, edge)
            for name, x, sr in material for deg, y, r, edge in degradations(x, sr, rng)]


# --- scoring ------------------------------------------------------------------------------------------


def judge(case: Case) -> dict:
    """What the detector says of one case, and whether that is right."""
    band = scan_band(case.x, case.sr)
    found = band.hz if band.source == "detected" else None
    if case.edge_hz is None:
        ok = found is None
    else:
        ok = found is not None and abs(found - case.edge_hz) <= TOLERANCE_HZ
    return {"material": case.material, "degradation": case.degradation, "channels": case.x.shape[1],
            "sr": case.sr, "true_edge_hz": case.edge_hz, "found_hz": found, "ok": ok}


def band_report(args: argparse.Namespace) -> dict:
    material = eval_references(args.eval) if args.eval else generated(args.seconds)
    rows = [judge(c) for c in bank(material)]
    edged = [r for r in rows if r["true_edge_hz"] is not None]
    full = [r for r in rows if r["true_edge_hz"] is None]
    return {"material": str(args.eval) if args.eval else "generated", "cases": rows,
            "hits": sum(r["ok"] for r in edged), "edged": len(edged),
            "false_positives": sum(not r["ok"] for r in full), "full_band": len(full)}


def render_band(r: dict) -> str:
    by_deg: dict[str, list[dict]] = {}
    for c in r["cases"]:
        by_deg.setdefault(c["degradation"], []).append(c)
    rows = []
    for deg, cs in by_deg.items():
        truth = cs[0]["true_edge_hz"]
        found = [c["found_hz"] for c in cs if c["found_hz"] is not None]
        rows.append([deg, "full band" if truth is None else f"{truth:.0f}",
                     f"{min(found):.0f}-{max(found):.0f}" if found else "-", f"{sum(c['ok'] for c in cs)}/{len(cs)}"])
    head = (f"band-edge detector on {r['material']} material: hit rate {r['hits']}/{r['edged']} within "
            f"±{TOLERANCE_HZ:.0f} Hz; false edges on full band {r['false_positives']}/{r['full_band']}")
    return "\n".join([head, "", *markdown_table(["input", "true edge (Hz)", "found (Hz)", "right"], rows)])


def add_band_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("band", help="the band-edge detector on a labelled bank of real encoders and filters",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", type=Path, metavar="DIR", help="use DIR/hr/*.flac as material (default: generated)")
    p.add_argument("--seconds", type=float, default=3.0, metavar="S", help="generated material length (default 3)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(threads=1, device="cpu")
    return p
