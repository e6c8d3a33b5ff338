"""`rtsr compare IN OUT --plot spec.png [--ref HR.flac]`: see what the upscaler added.

Log spectrograms of the input (brought to 48 kHz by rtsr's own resampler: what the upscale keeps
of it, nothing above its Nyquist), the output and, if given, the reference, stacked on one
frequency axis in kHz, with the cutoff the engine detects in the input marked: below it the
output should be the input, above it is what the model made. The spectrograms are the dev-eval
scorer's (2048-point Hann power STFT), so what is shown is what the LSD in the title measures.
Files whose lengths do not match (an output that is not this input's upscale) are warned about.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from rtsr.audio_io import AudioError, read_audio
from rtsr.bench_quality import SCORE_HOP, power_spec, score, scoring_cutoff, to_scoring_rate
from rtsr.features import SR
from rtsr.naive import detect_cutoff
from rtsr.resample import resample

DYNAMIC_RANGE_DB = 100.0
PLOT_HINT = "--plot needs matplotlib: pip install 'rtsr[plot]'"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="before/after log spectrograms of an upscaled file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="the low-resolution input")
    p.add_argument("output", type=Path, help="the upscaled output")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the stacked spectrograms here")
    p.add_argument("--ref", type=Path, metavar="HR", help="a high-resolution reference: adds its panel and the LSD")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    """Print cutoff and LSDs; draw the PNG if asked. Unreadable files are reported with status 2."""
    try:
        x, sr = read_audio(args.input)
        y, out_sr = read_audio(args.output)
        panels = {"input": to_scoring_rate(resample(x, sr), SR), "output": to_scoring_rate(y, out_sr)}
        if args.ref is not None:
            r, ref_sr = read_audio(args.ref)
            panels["reference"] = to_scoring_rate(r, ref_sr)
    except AudioError as e:
        print(f"rtsr compare: {e}", file=sys.stderr)
        return 2
    for name, sig in panels.items():
        if len(sig) != len(panels["input"]):
            print(f"rtsr compare: warning: the {name} is {len(sig) / SR:.3f} s, the input {len(x) / sr:.3f} s; "
                  "spectra and LSD compare them as they are", file=sys.stderr)
    cutoff = detect_cutoff(x, sr)
    lsds = _lsds(panels, sr) if args.ref is not None else {}
    title = f"{args.input.name} ({sr} Hz) -> {args.output.name}"
    if lsds:
        title += f" vs {args.ref.name}\nLSD {lsds['output']:.3f} (input resampled: {lsds['input']:.3f})"
    print(f"{title.replace(chr(10), ': ')}; detected input cutoff {cutoff / 1000:.2f} kHz")
    if args.plot is None:
        return 0
    try:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(panels, cutoff, lsds, title, args.plot)
    except ImportError:
        print(f"rtsr compare: {PLOT_HINT}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # an unwritable folder, an image format matplotlib does not know
        print(f"rtsr compare: cannot write {args.plot}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.plot}")
    return 0


def _lsds(panels: dict[str, np.ndarray], input_sr: int) -> dict[str, float]:
    """LSD of input and output against the reference, as the scorer computes it."""
    cut = scoring_cutoff(input_sr)
    return {k: score(panels["reference"], panels[k], cut)["lsd"] for k in ("input", "output")}


def plot(panels: dict[str, np.ndarray], cutoff_hz: float, lsds: dict[str, float], title: str, dest: Path) -> None:
    """One log spectrogram per panel, stacked, same time and colour scale, the cutoff dashed."""
    from matplotlib.figure import Figure  # optional extra: only this command needs it

    specs = {name: 10 * np.log10(power_spec(sig)) for name, sig in panels.items()}
    top = max(s.max() for s in specs.values())
    seconds = max(len(sig) for sig in panels.values()) / SR
    fig = Figure(figsize=(10, 2.4 * len(specs) + 0.8), layout="constrained")
    axes = fig.subplots(len(specs), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for ax, (name, spec) in zip(axes, specs.items(), strict=True):
        end = spec.shape[1] * SCORE_HOP / SR
        img = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=top - DYNAMIC_RANGE_DB, vmax=top,
                        extent=(0.0, end, 0.0, SR / 2000), interpolation="nearest")
        ax.axhline(cutoff_hz / 1000, color="cyan", linestyle="--", linewidth=1)
        label = "input, resampled to 48 kHz" if name == "input" else name
        ax.set_title(label + (f" (LSD {lsds[name]:.3f})" if name in lsds else ""), fontsize=10, loc="left")
        ax.set_ylabel("kHz")
        ax.set_xlim(0.0, seconds)
    axes[0].text(0.995, cutoff_hz / SR * 2 + 0.02, f"detected cutoff {cutoff_hz / 1000:.2f} kHz",
                 transform=axes[0].transAxes, ha="right", va="bottom", color="cyan", fontsize=9)
    axes[-1].set_xlabel("seconds")
    fig.colorbar(img, ax=list(axes), label="power dB", shrink=0.8)
    fig.suptitle(title, fontsize=11)
    fig.savefig(dest, dpi=80)
