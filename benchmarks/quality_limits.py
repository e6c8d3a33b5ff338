"""What limits the quality: the model's LSD next to oracles that know part of the answer.

Each oracle keeps the reference below the scorer's cutoff (a perfect low-band merge) and replaces
the bins above it, so the rows say how far each missing piece alone could take LSD / sinc:

- envelope, smooth: the reference's own spectral envelope (power averaged over 31 bins ~ 730 Hz
  and 3 frames), no fine structure: roughly the floor for a predictor of the expected log power;
- envelope, noisy: the same envelope times exponential (noise-like) fine structure: the floor for
  a generator that gets the envelope exactly right but, like a vocoder, invents the fine detail;
- vocoder on the true mel: the model's own vocoder fed the reference's 80-band log-mel (what a
  perfect mel predictor would reach with this vocoder);
- model + per-clip EQ: the model's output with the best fixed per-bin gain for each clip (what
  knowing each recording's long-term balance would buy).

    python benchmarks/quality_limits.py --eval ../shared/eval-dev --model basic
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import uniform_filter

from rtsr.audio_io import read_audio
from rtsr.bench_quality import (
    POWER_FLOOR,
    SCORE_FFT,
    Clip,
    clips,
    load_for_scoring,
    lsd,
    power_spec,
    scoring_cutoff,
    to_scoring_rate,
)
from rtsr.features import N_FFT, SR, istft, log_mel, stft
from rtsr.models.nets import to_complex
from rtsr.report import markdown_table
from rtsr.upscaler import Upscaler

EULER_LOG10 = 0.5772156649 / np.log(10)  # E[log10 of an exponential variable] = log10(mean) - this


def vocoded_true_mel(up: Upscaler, ref: np.ndarray) -> np.ndarray:
    """The reference's log-mel through the model's vocoder and iSTFT (whole signal, offline)."""
    x = torch.from_numpy(ref.astype(np.float32))[None]
    mel = log_mel(stft(torch.nn.functional.pad(x, (N_FFT // 2, N_FFT)))).transpose(1, 2)
    with torch.inference_mode():
        return istft(to_complex(up.model.vocoder(mel)))[0, : len(ref)].double().numpy()


def rows_for_clip(up: Upscaler, clip: Clip, rng: np.random.Generator) -> dict[str, float]:
    """Absolute LSD of sinc, the model and each oracle on one clip (ratios are taken per cell)."""
    ref = load_for_scoring(clip.hr)
    x, sr = read_audio(clip.lr)
    systems = {"model": to_scoring_rate(up.upscale(x, sr), SR), "sinc": load_for_scoring(clip.lr),
               "vocoder on the true mel": vocoded_true_mel(up, ref)}
    n = min(len(ref), *(len(v) for v in systems.values()))
    ref_p = power_spec(ref[:n])
    powers = {name: power_spec(v[:n]) for name, v in systems.items()}
    out = {"sinc": lsd(ref_p, powers["sinc"]), "model": lsd(ref_p, powers["model"])}
    k = int(round(scoring_cutoff(sr) / (SR / 2) * (SCORE_FFT // 2)))
    r = np.log10(ref_p)
    envelope = np.log10(uniform_filter(ref_p, size=(31, 3), mode="nearest"))[k:]
    model = np.log10(powers["model"][k:])
    above = {  # log10 power of the bins from the cutoff up
        "envelope, smooth": envelope - EULER_LOG10,
        "envelope, noisy": envelope + np.log10(rng.exponential(size=ref_p.shape))[k:],  # draws as published
        "vocoder on the true mel": np.log10(powers["vocoder on the true mel"][k:]),
        "model + per-clip EQ": model + np.median(r[k:] - model, axis=1, keepdims=True),
    }
    for name, est in above.items():
        out[name] = lsd(ref_p, np.vstack([ref_p[:k], np.maximum(10.0 ** est, POWER_FLOOR)]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", required=True, help="a dev-eval folder (hr/, lr/)")
    p.add_argument("--model", default="basic")
    a = p.parse_args()
    up = Upscaler.load(a.model)
    rng = np.random.default_rng(0)
    groups: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    for c in clips(Path(a.eval)):
        groups[(c.kind, c.sr)].append(rows_for_clip(up, c, rng))
    names = [k for k in next(iter(groups.values()))[0] if k != "sinc"]
    table, means = [], defaultdict(list)
    for (kind, sr), v in sorted(groups.items()):
        sinc = np.mean([r["sinc"] for r in v])
        ratios = {k: np.mean([r[k] for r in v]) / sinc for k in names}
        for k, q in ratios.items():
            means[k].append(q)
        table.append([kind, f"{sr // 1000} kHz", f"{sinc:.2f}", *(f"{ratios[k]:.3f}" for k in names)])
    table.append(["mean", "", "", *(f"**{np.mean(means[k]):.3f}**" for k in names)])
    print(f"LSD / sinc on {a.eval}, model {a.model} (sinc: absolute LSD)\n")
    print("\n".join(markdown_table(["kind", "input", "sinc", *names], table)))


if __name__ == "__main__":
    main()
