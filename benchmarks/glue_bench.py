"""Host time of the engine's glue per stream per 20 ms round, with the model's compute taken away.

N live 16 kHz streams are fed one 20 ms block each per round and stepped together the way
`rtsr serve` steps them (`rtsr.batch.step` over engine Streams); the model is the shipped model's
networks' shapes only (`ShapeStub`: the same caches and outputs, no arithmetic), so what is timed
is everything around the model call: resampling, STFT and log-mel, the band tracker, building the
requests, stacking and splitting the conv caches, merge, inverse FFT and overlap-add. That is the
per-stream cost that no accelerator removes (issue 28). Rounds after `--warmup` (by default past
the band tracker's first decision, ~1 s, as in a long live call) are timed; the first rounds,
while the tracker still decides, are reported apart.

    python benchmarks/glue_bench.py --streams 256 --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rtsr import batch
from rtsr.bench import speech_like
from rtsr.engine import Stream
from rtsr.features import N_BINS
from rtsr.model import SuperResModel, bundled_path
from rtsr.models.nets import Denoiser, Vocoder

SR_IN = 16000
BLOCK = SR_IN // 50  # 20 ms


class ShapeStub(SuperResModel):
    """A model with the shipped model's state and output shapes and none of its arithmetic."""

    @classmethod
    def like(cls, name: str = "basic") -> ShapeStub:
        cfg = json.loads((bundled_path(name) / "config.json").read_text())
        return cls(Denoiser(**cfg["denoiser"]), Vocoder(**cfg["vocoder"]), cfg["steps"], cfg.get("guidance", 1.0),
                   cfg["lookahead"], f"{name}-shapes")

    def hop(self, state, cond, low, cutoff, noise) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(cond.shape[0], cond.shape[2], N_BINS)
        return zeros, zeros


class Timer:
    """Seconds spent per stage, summed over the timed rounds."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.on = False

    def wrap(self, stage: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.on:
                    self.spent[stage] = self.spent.get(stage, 0.0) + time.perf_counter() - t0
        return timed


def rounds(n_streams: int, n_rounds: int, warmup: int) -> dict:
    """Feed n_streams streams n_rounds + warmup blocks; time the last n_rounds (and the first warmup)."""
    model, timer = ShapeStub.like(), Timer()
    model.run_slots = timer.wrap("model_call", model.run_slots)
    for stage in ("analyse", "synthesise"):  # the stages batch.step runs for all the streams at once
        setattr(batch, stage, timer.wrap(stage, getattr(batch, stage)))
    streams = [Stream(model, SR_IN, 1, 20.0, seed=k) for k in range(n_streams)]
    for s in streams:
        s.add_output = timer.wrap("overlap_add", s.add_output)
    x = speech_like(SR_IN, (n_rounds + warmup) * BLOCK / SR_IN + 0.1)
    warm_s = timed_s = 0.0
    for r in range(warmup + n_rounds):
        timer.on = r >= warmup
        block = x[r * BLOCK:(r + 1) * BLOCK]
        t0 = time.perf_counter()
        for s in streams:
            s.push(block)
        t1 = time.perf_counter()
        batch.step(streams)
        t2 = time.perf_counter()
        if timer.on:
            timer.spent["push"] = timer.spent.get("push", 0.0) + t1 - t0
            timed_s += t2 - t0
        else:
            warm_s += t2 - t0
    per = 1e6 / (n_streams * n_rounds)
    stages = {k: round(v * per, 1) for k, v in timer.spent.items()}
    stages["rest"] = round(timed_s * per - sum(stages.values()), 1)
    return {"streams": n_streams, "rounds": n_rounds, "us_per_stream_round": round(timed_s * per, 1),
            "us_per_stream_round_warmup": round(1e6 * warm_s / (n_streams * max(warmup, 1)), 1),
            "stages_us_per_stream_round": stages}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--rounds", type=int, default=50, help="timed rounds of 20 ms")
    p.add_argument("--warmup", type=int, default=80, help="rounds before timing (the tracker decides in these)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    r = rounds(args.streams, args.rounds, args.warmup)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['streams']} streams, {r['rounds']} rounds: {r['us_per_stream_round']} us per stream per round "
          f"({r['us_per_stream_round_warmup']} while the band tracker decides)")
    for stage, us in r["stages_us_per_stream_round"].items():
        print(f"  {stage}: {us} us")


if __name__ == "__main__":
    main()
