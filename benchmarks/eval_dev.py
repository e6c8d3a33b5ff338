"""Upscale a dev-eval folder (hr/NAME.flac, lr/NAME_SR.wav) with a model and score it with the
reference scorer, printing LSD per kind and input rate next to the plain-resampling baseline.

    python benchmarks/eval_dev.py models/basic --eval ../shared/eval-dev --out /tmp/eval_basic
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import soundfile as sf

from rtsr import Upscaler


def run_scorer(eval_dir: Path, target: str) -> dict:
    out = subprocess.run([sys.executable, str(eval_dir / "score.py"), str(eval_dir), target],
                         check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {(r["kind"], r["sr"]): r for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--eval", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "eval-dev")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int)
    a = p.parse_args()
    up = Upscaler.load(a.model, steps=a.steps)
    a.out.mkdir(parents=True, exist_ok=True)
    audio_s = compute_s = 0.0
    for lr in sorted((a.eval / "lr").glob("*.wav")):
        x, sr = sf.read(lr, dtype="float32")
        t = time.perf_counter()
        y = up.upscale(x, sr)
        compute_s += time.perf_counter() - t
        audio_s += len(x) / sr
        sf.write(a.out / lr.name, y, 48000, subtype="FLOAT")
    ours, sinc = run_scorer(a.eval, str(a.out)), run_scorer(a.eval, "--sinc")
    print(f"model {a.model} steps {up.model.steps}: RTF {compute_s / audio_s:.3f} (offline, this CPU)")
    print("| kind | sr | LSD | sinc LSD | ratio | LSD HF | LSD LF | low-band SNR dB | max lag |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted(ours):
        o, s = ours[key], sinc[key]
        print(f"| {key[0]} | {key[1]} | {o['lsd']:.3f} | {s['lsd']:.3f} | {o['lsd'] / s['lsd']:.3f} | "
              f"{o['lsd_hf']:.3f} | {o['lsd_lf']:.3f} | {o['snr_lowband_db']:.1f} | {o['max_abs_lag']} |")


if __name__ == "__main__":
    main()
