"""Streaming resampler vs soxr (HQ): speed, chunked == whole, lag and length. Prints a markdown table.

soxr is only a yardstick here (pip install soxr), never a runtime dependency. Lag is measured against
scipy's zero-phase resample_poly; "held back" is how many output samples a stream still owes after
all input so far went in (its algorithmic latency), read just before the final flush.

    python benchmarks/resample_bench.py [--seconds 10]
"""

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import soxr
from scipy.signal import resample_poly

from rtsr.report import markdown_table
from rtsr.resample import StreamingResampler, resample

SR_OUT = 48000
T = TypeVar("T")


def _best_time(fn: Callable[[], T], repeats: int = 3) -> tuple[float, T]:
    """Fastest of a few runs: the machine is shared, and the minimum is the least noisy estimate."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def _lag(y: np.ndarray, ref: np.ndarray, max_lag: int = 400) -> float:
    """Lag of y behind ref in output samples, from the cross-correlation peak (parabolic refinement)."""
    n = min(len(y), len(ref)) - 2 * max_lag
    seg = ref[max_lag : max_lag + n]
    c = np.array([np.dot(y[max_lag + k : max_lag + k + n], seg) for k in range(-max_lag, max_lag + 1)])
    k = int(np.argmax(c))
    if 0 < k < len(c) - 1:
        return k - max_lag + 0.5 * (c[k - 1] - c[k + 1]) / (c[k - 1] - 2 * c[k] + c[k + 1])
    return float(k - max_lag)


def _ours_blocks(x: np.ndarray, sr_in: int, block: int) -> tuple[np.ndarray, int]:
    """Our stream in 20 ms blocks, plus how many outputs it had emitted before the flush."""
    r = StreamingResampler(sr_in, SR_OUT)
    parts = [r.process(x[i : i + block, None]) for i in range(0, len(x), block)]
    return np.concatenate(parts + [r.flush()])[:, 0], sum(map(len, parts))


def _soxr_blocks(x: np.ndarray, sr_in: int, block: int) -> tuple[np.ndarray, int]:
    """soxr's stream in 20 ms blocks, plus how many outputs it had emitted before the last chunk."""
    s = soxr.ResampleStream(sr_in, SR_OUT, 1, dtype="float32", quality="HQ")
    parts = [s.resample_chunk(x[i : i + block]) for i in range(0, len(x), block)]
    return np.concatenate(parts + [s.resample_chunk(x[:0], last=True)]), sum(map(len, parts))


def bench(sr_in: int, seconds: float) -> list[list[str]]:
    """One table row (its cells) per resampler for sr_in -> 48 kHz."""
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(int(seconds * sr_in))).astype(np.float32)
    block = sr_in // 50  # 20 ms
    expected = round(len(x) * SR_OUT / sr_in)
    r = StreamingResampler(sr_in, SR_OUT)
    ref = resample_poly(x.astype(np.float64), r.up, r.down)[:expected]
    resample(x[:block], sr_in)  # load/compile the numba kernel outside the timings

    rows = []
    for name, blocks, whole in [
        ("rtsr (ours)", _ours_blocks, lambda: resample(x, sr_in)),
        ("soxr HQ", _soxr_blocks, lambda: soxr.resample(x, sr_in, SR_OUT, quality="HQ")),
    ]:
        t_blocks, (y_blocks, emitted) = _best_time(lambda b=blocks: b(x, sr_in, block))
        t_whole, y_whole = _best_time(whole)
        n = min(len(y_blocks), len(y_whole))
        held = expected - emitted
        diff = np.abs(y_blocks[:n] - y_whole[:n]).max()
        rows.append([f"{sr_in / 1000:g}k→48k", name, f"{seconds / t_blocks:.0f}×", f"{seconds / t_whole:.0f}×",
                     f"{diff:.2e}", f"{len(y_blocks)} / {len(y_whole)} / {expected}",
                     f"{_lag(y_blocks, ref):+.2f} / {_lag(y_whole, ref):+.2f}", f"{held} ({held / 48:.2f} ms)"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the test signal")
    args = parser.parse_args()
    header = ["conversion", "resampler", "20 ms blocks", "whole signal", "max abs chunked − whole",
              "length chunked / whole / expected", "lag chunked / whole (out samples)", "held back in stream"]
    rows = [row for sr_in in (16000, 44100) for row in bench(sr_in, args.seconds)]
    print("\n".join(markdown_table(header, rows)))


if __name__ == "__main__":
    main()
