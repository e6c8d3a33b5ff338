"""`rtsr bench quality`: score a model on a dev-eval folder next to plain resampling and a naive
non-learned extension, with the dev-eval scorer's metrics.

The metrics below are the reference scorer's (shared/eval-dev/score.py, which the project is
judged by) to the letter: LSD on a 2048/512 Hann power STFT clamped at 1e-8; the HF/LF split at
0.95 x the input's Nyquist; low-band SNR through a 10th-order Butterworth at 0.9 x that cutoff,
filtered forward and backward; lag from the cross-correlation peak within +-9600 samples of the
first 10 s. They are reimplemented here because users do not have the scorer; a test checks
that both give the same numbers on a dev clip. "sinc" is the scorer's own baseline: the input
brought to 48 kHz by scipy's resample_poly.

`--visqol` adds ViSQOL v3 (audio mode, MOS-LQO 1-5), the perceptual measure AP-BWE and FLowHigh
report beside LSD, computed as score.py's `visqol_moslqo` does with visqol-python (the `eval`
extra). It is a flag because it makes the run several times longer (the dev set on 2 cores: 41 s
without it, 3 min 39 s with it, about 1 s per 8 s clip and system).

    rtsr bench quality --eval ../shared/eval-dev --model basic [--visqol]
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy import signal

from rtsr.audio_io import read_audio, write_audio
from rtsr.features import SR
from rtsr.naive import SLOPE_DB_PER_OCTAVE, extend
from rtsr.report import markdown_table
from rtsr.upscaler import Upscaler

SCORE_FFT, SCORE_HOP = 2048, 512
POWER_FLOOR = 1e-8
HF_FROM = 0.95  # x the input's Nyquist: where the scorer's "above the cutoff" band starts
MAX_LAG = 9600  # samples (200 ms) searched either side
LAG_SECONDS = 10  # of the signal used for the lag
SILENT = 10 ** -7.5  # power within 5 dB of the floor: digital silence left by a codec
CLIFF_DB, KHZ_BINS, QUARTER_KHZ_BINS = 30.0, 43, 10
METRICS = ("lsd_inband", "lsd", "lsd_hf", "lsd_lf", "snr_lowband_db", "snr_lowband_steep_db", "hf_envelope_corr",
           "hf_flatness_ratio")


# --- the scorer's metrics ---------------------------------------------------------------------


def to_scoring_rate(x: np.ndarray, sr: int) -> np.ndarray:
    """Mono float64 at 48 kHz by scipy's resample_poly: how the scorer reads every signal, and
    therefore also its "sinc" baseline when applied to the low-resolution input."""
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if sr != SR:
        g = gcd(SR, int(sr))
        x = signal.resample_poly(x, SR // g, int(sr) // g)
    return x


def load_for_scoring(path: str | Path) -> np.ndarray:
    """A file as the scorer reads it: float64, channels averaged, at 48 kHz."""
    x, sr = sf.read(path, dtype="float64", always_2d=True)
    return to_scoring_rate(x, sr)


def power_spec(x: np.ndarray) -> np.ndarray:
    """(bins, frames) power STFT, Hann 2048 / hop 512, no padding, floored at 1e-8."""
    _, _, z = signal.stft(x, fs=SR, window="hann", nperseg=SCORE_FFT, noverlap=SCORE_FFT - SCORE_HOP,
                          boundary=None, padded=False)
    z = z * (SCORE_FFT / 2)  # undo scipy's 1/sum(window): the magnitudes of torch.stft and librosa
    return np.maximum(np.abs(z) ** 2, POWER_FLOOR)


def lsd(ref_p: np.ndarray, est_p: np.ndarray, lo: int = 0, hi: int | None = None) -> float:
    """Log-spectral distance over bins [lo, hi): RMS over frequency of the log10 power ratio, mean over frames."""
    d = np.log10(ref_p[lo:hi]) - np.log10(est_p[lo:hi])
    return float(np.mean(np.sqrt(np.mean(d ** 2, axis=0))))


def lag_samples(ref: np.ndarray, est: np.ndarray, max_lag: int = MAX_LAG) -> int:
    """Where |cross-correlation| of the first 10 s peaks: positive when est comes late."""
    n = min(len(ref), len(est), SR * LAG_SECONDS)
    c = signal.correlate(est[:n], ref[:n], mode="full", method="fft")
    win = c[n - 1 - max_lag: n + max_lag]
    return int(np.argmax(np.abs(win)) - max_lag)


def score(ref: np.ndarray, est: np.ndarray, cutoff: float) -> dict[str, float | int]:
    """All metrics of one 48 kHz estimate against its reference; `cutoff` in Hz splits HF from LF."""
    n = min(len(ref), len(est))
    lag = lag_samples(ref, est)
    ref, est = ref[:n], est[:n]
    rp, ep = power_spec(ref), power_spec(est)
    k = int(round(cutoff / (SR / 2) * (SCORE_FFT // 2)))
    sos = signal.butter(10, 0.9 * cutoff, fs=SR, output="sos")
    rl, el = signal.sosfiltfilt(sos, ref), signal.sosfiltfilt(sos, est)
    snr = 10 * np.log10(np.sum(rl ** 2) / max(np.sum((rl - el) ** 2), 1e-20))
    return {"lsd": lsd(rp, ep), "lsd_hf": lsd(rp, ep, k), "lsd_lf": lsd(rp, ep, 0, k),
            "snr_lowband_db": float(snr), "lag_samples": lag, "len_ref": n, "len_est_vs_ref": int(len(est) - n)}


def band_edge_bin(ref_p: np.ndarray) -> int:
    """One past the highest bin (of 1025) inside the reference's own band (score.py's
    `ref_band_edge_bin`): below the bins digitally silent in most active frames, and below a
    codec's low-pass cliff, i.e. the first run of positions where the mean level over the kHz
    under it is >= 30 dB above the 90th percentile of everything from 1 kHz over it to the top;
    the edge is the run's steepest 250 Hz step. Why: a codec's silence is no ground truth for
    what a full-band upscaler should put there, so in-band scores and training losses stop here."""
    e = ref_p.sum(axis=0)
    p = ref_p[:, e > e.max() * 1e-3]
    has = np.nonzero((p <= SILENT).mean(axis=1) < 0.5)[0]
    edge = int(has.max()) + 1 if len(has) else ref_p.shape[0]
    level = np.convolve(10 * np.log10(p.mean(axis=1)), np.ones(5) / 5, mode="same")
    kz, q = KHZ_BINS, QUARTER_KHZ_BINS

    def cliff(b: int) -> bool:
        return level[b - kz:b].mean() - np.percentile(level[b + kz:], 90) >= CLIFF_DB

    for a in range(4 * kz, len(level) - kz):
        if cliff(a):
            z = a
            while z + 1 < len(level) - kz and cliff(z + 1):
                z += 1
            b = max(range(a, z + 1), key=lambda i: level[i - q:i].mean() - level[i:i + q].mean())
            return min(edge, b)
    return edge


def band_edge_hz(x: np.ndarray) -> float:
    """A 48 kHz signal's own band edge in Hz (band_edge_bin on its scoring spectrum)."""
    return float(min(band_edge_bin(power_spec(np.asarray(x, np.float64))) * SR / SCORE_FFT, SR / 2))


def score_inband(ref: np.ndarray, est: np.ndarray, cutoff: float) -> dict[str, float]:
    """LSD over the reference's own band (and that edge in Hz), and the low band's SNR through a
    steep filter (Chebyshev II, 80 dB stop band, at 0.9 x cutoff) that, unlike `score`'s order-10
    Butterworth, keeps the generated band just above the cutoff out of the check."""
    n = min(len(ref), len(est))
    ref, est = ref[:n], est[:n]
    rp, ep = power_spec(ref), power_spec(est)
    k = band_edge_bin(rp)
    sos = signal.cheby2(10, 80, 0.9 * cutoff, fs=SR, output="sos")
    rl, el = signal.sosfiltfilt(sos, ref), signal.sosfiltfilt(sos, est)
    snr = 10 * np.log10(np.sum(rl ** 2) / max(np.sum((rl - el) ** 2), 1e-20))
    return {"lsd_inband": lsd(rp, ep, 0, k), "ref_edge_hz": float(min(k * SR / SCORE_FFT, SR / 2)),
            "snr_lowband_steep_db": float(snr)}


def score_realism(ref: np.ndarray, est: np.ndarray, cutoff: float) -> dict[str, float]:
    """Two things listening notices and LSD does not (LSD rewards a smooth mean), over the generated
    band [cutoff, the reference's own edge) of the frames where the reference is active:

    - hf_envelope_corr: Pearson correlation of the band's temporal envelope (its energy per 10.7 ms
      frame, in dB) with the reference's: transients where they belong, 1 at best, 0 for a flat
      or absent band;
    - hf_flatness_ratio: the band's spectral flatness (Wiener entropy: geometric over arithmetic
      mean of its power spectrum, Johnston 1988), mean over frames, over the reference's: 1 when
      as noise-like as the reference, above 1 when noisier/flatter, below when too tonal or empty.
    """
    n = min(len(ref), len(est))
    rp, ep = power_spec(ref[:n]), power_spec(est[:n])
    lo = int(round(cutoff / (SR / 2) * (SCORE_FFT // 2)))
    hi = band_edge_bin(rp)
    e = rp.sum(axis=0)
    active = e > e.max() * 1e-3
    if hi - lo < 4 or active.sum() < 3:
        return {"hf_envelope_corr": float("nan"), "hf_flatness_ratio": float("nan")}
    r, g = rp[lo:hi, active], ep[lo:hi, active]
    env_r, env_g = 10 * np.log10(r.sum(axis=0)), 10 * np.log10(g.sum(axis=0))
    corr = 0.0 if env_g.std() < 1e-9 or env_r.std() < 1e-9 else float(np.corrcoef(env_r, env_g)[0, 1])

    def flatness(p: np.ndarray) -> float:
        return float(np.mean(np.exp(np.log(p).mean(axis=0)) / p.mean(axis=0)))

    return {"hf_envelope_corr": corr, "hf_flatness_ratio": flatness(g) / flatness(r)}


@cache
def _visqol() -> Any:
    """One ViSQOL instance per process: its SVR model is loaded once."""
    try:
        from visqol import VisqolApi
    except ImportError as e:
        raise RuntimeError("ViSQOL needs visqol-python: pip install 'rtsr[eval]'") from e
    api = VisqolApi()
    api.create(mode="audio")
    return api


def visqol_moslqo(ref: np.ndarray, est: np.ndarray) -> float:
    """ViSQOL v3 audio-mode MOS-LQO (1-5) of a 48 kHz mono estimate against its reference, both cut
    to the shorter: what LSD misses (it rewards a smooth mean band; ViSQOL hears its texture)."""
    n = min(len(ref), len(est))
    got = _visqol().measure_from_arrays(np.asarray(ref[:n], np.float64), np.asarray(est[:n], np.float64), SR)
    return float(got.moslqo)


def scoring_cutoff(input_sr: int) -> float:
    return input_sr / 2 * HF_FROM


# --- a dev-eval folder --------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """One input of an eval folder: lr/NAME_SR.wav, its reference hr/NAME.flac; kind = NAME up to '_'."""

    lr: Path
    hr: Path
    sr: int

    @property
    def base(self) -> str:
        return self.lr.stem

    @property
    def kind(self) -> str:
        return self.base.split("_")[0]


def clips(eval_dir: Path) -> list[Clip]:
    """Every lr/NAME_SR.wav with its hr/NAME.flac, sorted; a missing reference is an error."""
    found = []
    for lr in sorted((eval_dir / "lr").glob("*.wav")):
        name, sr = lr.stem.rsplit("_", 1)
        hr = eval_dir / "hr" / f"{name}.flac"
        if not hr.exists():
            raise FileNotFoundError(f"{lr} has no reference {hr}")
        found.append(Clip(lr, hr, int(sr)))
    if not found:
        raise FileNotFoundError(f"{eval_dir} has no lr/*.wav (expected hr/NAME.flac and lr/NAME_SR.wav)")
    return found


System = Callable[[np.ndarray, int], np.ndarray]  # (input frames, sr) -> 48 kHz output


def systems(ups: list[Upscaler], slope_db: float) -> dict[str, System]:
    """Labelled upscalers: the two baselines first, then one entry per loaded model."""
    out: dict[str, System] = {"sinc": to_scoring_rate,
                              f"naive ({slope_db:g} dB/oct)": lambda x, sr: extend(x, sr, slope_db)}
    for up in ups:
        out[f"{up.model.name} ({_passes(up.model.steps)})"] = up.upscale
    return out


def _passes(steps: int) -> str:
    """How a model runs, for its label: a regression network (0 sampler steps) runs one pass."""
    return "one pass" if steps == 0 else f"{steps} step{'s' * (steps != 1)}"


def run_system(label: str, fn: System, items: list[Clip], refs: dict[Path, np.ndarray],
               out_dir: Path | None, visqol: bool = False) -> tuple[list[dict], float]:
    """Upscale and score every clip with one system (with ViSQOL when asked); returns per-clip rows
    and compute seconds (after a short warm-up, so one-off kernel loading is not charged to the
    first clip)."""
    rows, compute = [], 0.0
    x, sr = read_audio(items[0].lr)
    fn(x[: sr // 2], sr)
    for c in items:
        x, sr = read_audio(c.lr)
        t0 = time.perf_counter()
        y = fn(x, sr)
        compute += time.perf_counter() - t0
        if out_dir is not None:
            dest = out_dir / _slug(label) / f"{c.base}.wav"
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_audio(dest, y, SR, overwrite=True)
        est = to_scoring_rate(y, SR)
        rows.append({"system": label, "clip": c.base, "kind": c.kind, "sr": sr,
                     **score(refs[c.hr], est, scoring_cutoff(sr)),
                     **score_inband(refs[c.hr], est, scoring_cutoff(sr)),
                     **score_realism(refs[c.hr], est, scoring_cutoff(sr))})
        if visqol:
            rows[-1]["visqol"] = visqol_moslqo(refs[c.hr], est)
    return rows, compute


def _slug(label: str) -> str:
    """A system's label as a folder name: "basic (1 step)" -> "basic-1-step"."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def summarise(per_clip: list[dict]) -> list[dict]:
    """Per (system, kind, rate): mean metrics and the worst |lag|, with LSD ratios to sinc."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in per_clip:
        groups[(r["kind"], r["sr"], r["system"])].append(r)
    metrics = METRICS + ("visqol",) * ("visqol" in per_clip[0])
    rows = []
    for (kind, sr, system), v in groups.items():
        row = {"kind": kind, "sr": sr, "system": system, "n": len(v),
               **{m: float(np.nanmean([r[m] for r in v])) if any(np.isfinite(r[m]) for r in v) else float("nan")
                  for m in metrics},
               "max_abs_lag": max(abs(r["lag_samples"]) for r in v)}
        rows.append(row)
    sinc = {(r["kind"], r["sr"]): r for r in rows if r["system"] == "sinc"}
    for r in rows:
        base = sinc[(r["kind"], r["sr"])]
        r["lsd_inband_vs_sinc"] = r["lsd_inband"] / base["lsd_inband"]
        r["lsd_vs_sinc"] = r["lsd"] / base["lsd"]
        r["lsd_hf_vs_sinc"] = r["lsd_hf"] / base["lsd_hf"]
    order = list(dict.fromkeys(r["system"] for r in per_clip))
    return sorted(rows, key=lambda r: (r["kind"], r["sr"], order.index(r["system"])))


def table(rows: list[dict]) -> str:
    """The summary as Markdown, one row per (kind, rate, system); ViSQOL after in-band LSD when scored."""
    vq = "visqol" in rows[0]
    return "\n".join(markdown_table(
        ["kind", "input Hz", "system", "in-band LSD", "in-band / sinc", *["ViSQOL"] * vq, "LSD", "LSD / sinc",
         "LSD HF / sinc", "LSD LF", "low-band SNR dB (steep)", "HF envelope corr", "HF flatness / ref", "max lag"],
        [[r["kind"], r["sr"], r["system"], f"{r['lsd_inband']:.3f}", f"{r['lsd_inband_vs_sinc']:.3f}",
          *([f"{r['visqol']:.2f}"] if vq else []), f"{r['lsd']:.3f}", f"{r['lsd_vs_sinc']:.3f}",
          f"{r['lsd_hf_vs_sinc']:.3f}",
          f"{r['lsd_lf']:.3f}", f"{r['snr_lowband_steep_db']:.1f}", f"{r['hf_envelope_corr']:.2f}",
          f"{r['hf_flatness_ratio']:.2f}", r["max_abs_lag"]]
         for r in rows]))


def mean_ratios(rows: list[dict], key: str = "lsd_vs_sinc") -> dict[str, float]:
    """Each system's LSD / sinc (or another column) averaged over the (kind, rate) groups."""
    by: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by[r["system"]].append(r[key])
    return {s: float(np.mean(v)) for s, v in by.items()}


# --- the command --------------------------------------------------------------------------------


def add_quality_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quality", help="LSD and friends on an eval folder, next to sinc and naive baselines",
        description="Upscale every lr/NAME_SR.wav of an eval folder and score it against hr/NAME.flac "
                    "with the dev-eval scorer's metrics, next to plain resampling (sinc) and a naive "
                    "noise extension; a Markdown table per kind and input rate.")
    p.add_argument("--eval", type=Path, required=True, metavar="DIR",
                   help="folder with hr/NAME.flac and lr/NAME_SR.wav (like shared/eval-dev)")
    p.add_argument("--steps", type=int, nargs="+", metavar="N",
                   help="sampler steps to score, one row each (default: the model's)")
    p.add_argument("--slope", type=float, default=SLOPE_DB_PER_OCTAVE, metavar="DB",
                   help=f"the naive baseline's slope above the cutoff, dB/octave (default {SLOPE_DB_PER_OCTAVE:g})")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="also write every output as DIR/<system>/NAME_SR.wav (scorable by score.py)")
    p.add_argument("--visqol", action="store_true",
                   help="also score ViSQOL v3 audio-mode MOS-LQO (needs the eval extra: pip install 'rtsr[eval]'; "
                        "several times slower: about 1 s per 8 s clip and system)")
    return p


def quality_report(args: argparse.Namespace) -> dict:
    """Every system on every clip: summary rows, per-clip scores and offline compute per system."""
    items = clips(args.eval)
    if args.visqol:
        _visqol()  # a missing visqol-python is reported now, not after the upscaling
    ups = [Upscaler.load(args.model, args.device, k, args.seed, args.backend) for k in args.steps or [None]]
    refs = {c.hr: load_for_scoring(c.hr) for c in items}
    per_clip, compute = [], {}
    audio_s = sum(sf.info(c.lr).duration for c in items)
    for label, fn in systems(ups, args.slope).items():
        rows, compute[label] = run_system(label, fn, items, refs, args.out, args.visqol)
        per_clip += rows
    rows = summarise(per_clip)
    means = {"mean_visqol": mean_ratios(rows, "visqol")} if args.visqol else {}
    return {"eval": str(args.eval), "clips": len(items), "audio_s": audio_s, "rows": rows,
            "mean_lsd_inband_vs_sinc": mean_ratios(rows, "lsd_inband_vs_sinc"),
            "mean_lsd_vs_sinc": mean_ratios(rows), **means,
            "rtf": {k: v / audio_s for k, v in compute.items()}, "per_clip": per_clip}


def render_quality(report: dict) -> str:
    """The report for people: the table, then one line per system."""
    lines = [f"{report['clips']} clips, {report['audio_s']:.0f} s of input from {report['eval']}", "",
             table(report["rows"]), ""]
    for system, ratio in report["mean_lsd_inband_vs_sinc"].items():
        vq = f", mean ViSQOL {report['mean_visqol'][system]:.2f}" if "mean_visqol" in report else ""
        lines.append(f"- {system}: mean in-band LSD / sinc {ratio:.3f} (full band "
                     f"{report['mean_lsd_vs_sinc'][system]:.3f}){vq}, offline RTF {report['rtf'][system]:.3f}")
    return "\n".join(lines)
