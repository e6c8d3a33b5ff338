"""Host time of the engine's glue per stream per 20 ms round, with the model's compute taken away.

N live 16 kHz streams are fed one 20 ms block each per round and stepped together the way
`rtsr serve` steps them (`rtsr.batch.step` over engine Streams, in a new order every round, as
their blocks come); the model is the shipped model's networks' shapes only (`ShapeStub`: the same
caches and outputs, no arithmetic), so what is timed is everything around the model call:
resampling, framing, STFT and log-mel and queueing the frames (`analyse`), the band tracker,
gathering a hop's inputs, the conv caches' way in and out of the model call (`model_call`),
merge and inverse FFT (`synthesise`) and overlap-add. That is the per-stream cost that no
accelerator removes (issue 28). Rounds after `--warmup` (by default past the band tracker's first
decision, ~1.4 s, as in a long live call) are timed; the first rounds, while the tracker still
decides (a 4096-point spectrum every 2048 samples, then the decisions), are reported apart; so is
the spread of whole rounds from the first (`round_ms`: p50, p99, max; the decision rounds are a
server's tail when its streams start together). The model is warmed up first as `rtsr serve`
warms it up (`Upscaler.warm_up`), so one-off loading is in neither.

    python benchmarks/glue_bench.py --streams 256 --json
    python benchmarks/glue_bench.py --streams 256 --versus /tmp/before   # another checkout beside this one
    python benchmarks/glue_bench.py --streams 256 --service   # what `rtsr serve`'s protocol adds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import signal

from rtsr import batch, engine
from rtsr.bench import speech_like
from rtsr.engine import Stream
from rtsr.features import N_BINS
from rtsr.hopbank import HopBank
from rtsr.model import SuperResModel, bundled_path
from rtsr.models.nets import Denoiser, Vocoder
from rtsr.upscaler import Upscaler

HERE = Path(__file__).resolve().parents[1]
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
        for cache in (*state.steps, state.vocoder):  # new caches, as a real call returns (written back after)
            for key, t in cache.items():
                cache[key] = torch.empty_like(t)
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


def rounds(n_streams: int, n_rounds: int, warmup: int, band_hz: float | None = None, waves: int = 1) -> dict:
    """Feed n_streams streams n_rounds + warmup blocks; time the last n_rounds (and the first warmup).
    band_hz: the test signal low-passed there, so the band tracker lowers the band and watches
    the spectrum for ~10 s (a phone call, a codec-limited stream). waves: each round's streams are
    stepped in this many random parts, as a server whose polls find some streams' blocks at a time."""
    model, timer = ShapeStub.like(), Timer()
    model.run_slots = timer.wrap("model_call", model.run_slots)
    # the stages run for all the streams at once; analysis begins with resampling (one intake call)
    joint = {(module, stage): getattr(module, stage)
             for module, stage in ((engine, "analyse"), (engine, "synthesise"), (HopBank, "overlap_add"))}
    for (module, stage), fn in joint.items():
        setattr(module, stage, timer.wrap(stage, fn))
    try:
        return _timed(model, timer, n_streams, n_rounds, warmup, band_hz, waves)
    finally:
        for (module, stage), fn in joint.items():
            setattr(module, stage, fn)


def _timed(model: ShapeStub, timer: Timer, n_streams: int, n_rounds: int, warmup: int,
           band_hz: float | None, waves: int) -> dict:
    # one-off loading (compiled kernels, the band decision's too; lazy imports) goes first, as
    # `rtsr serve` and `rtsr live` warm up; its stream is gone after, its bank rows free again
    Upscaler(model).warm_up(SR_IN)
    streams = [Stream(model, SR_IN, 1, 20.0, seed=k) for k in range(n_streams)]
    x = speech_like(SR_IN, (n_rounds + warmup) * BLOCK / SR_IN + 0.1)
    if band_hz:
        x = signal.sosfilt(signal.butter(12, band_hz, fs=SR_IN, output="sos"), x, axis=0).astype(np.float32)
    warm_s = timed_s = 0.0
    round_ms = []
    order = np.random.default_rng(0)
    for r in range(warmup + n_rounds):
        timer.on = r >= warmup
        block = x[r * BLOCK:(r + 1) * BLOCK]
        arrived = [streams[k] for k in order.permutation(n_streams)]  # a server's streams, as their blocks came
        t0 = time.perf_counter()
        for s in arrived:
            s.push(block)
        t1 = time.perf_counter()
        for wave in np.array_split(np.arange(n_streams), waves):
            batch.step([arrived[k] for k in wave])
        t2 = time.perf_counter()
        round_ms.append(1e3 * (t2 - t0))
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
            "round_ms": {q: round(float(np.percentile(round_ms, v)), 1) for q, v in (("p50", 50), ("p99", 99),
                                                                                    ("max", 100))},
            "stages_us_per_stream_round": stages}


def service_rounds(n_streams: int, n_rounds: int, warmup: int) -> dict:
    """What `rtsr serve` adds per stream and round: N streams opened in a `Service` (the protocol
    state machine, no sockets) and each round's blocks handed to it as the messages a client
    sends (header, PCM), beside N twin engine streams pushed and stepped bare, the two alternating
    round by round in this process; the difference is the protocol's work (decoding and checking
    a message, sequencing, the reply)."""
    from rtsr import protocol as P
    from rtsr.serve import Limits, Service

    up = Upscaler(ShapeStub.like())
    service = Service({"basic": up}, "basic", Limits(max_streams=n_streams, max_streams_per_peer=n_streams))
    tokens = []
    for k in range(n_streams):
        [(_, opened)] = service.handle_batch([(b"peer", P.encode({"type": "open", "stream": k, "sr": SR_IN}))])
        tokens.append(P.decode_header(opened[0])["token"])
    twins = [Stream(up.model, SR_IN, 1, 20.0) for _ in range(n_streams)]
    x = speech_like(SR_IN, (n_rounds + warmup) * BLOCK / SR_IN + 0.1)
    spent = {"service": 0.0, "engine": 0.0}
    for r in range(warmup + n_rounds):
        block = x[r * BLOCK:(r + 1) * BLOCK]
        msgs = [(b"peer", P.encode({"type": "audio", "stream": k, "token": tokens[k], "seq": r}, block.tobytes()))
                for k in range(n_streams)]
        t0 = time.perf_counter()
        replies = service.handle_batch(msgs)
        t1 = time.perf_counter()
        for s in twins:
            s.push(block)
        batch.step(twins)
        t2 = time.perf_counter()
        assert all(P.decode_header(frames[0])["type"] == "audio" for _, frames in replies)
        if r >= warmup:
            spent["service"] += t1 - t0
            spent["engine"] += t2 - t1
    us = {k: round(v * 1e6 / (n_streams * n_rounds), 1) for k, v in spent.items()}
    return {"streams": n_streams, "rounds": n_rounds, "service_us_per_stream_round": us["service"],
            "engine_us_per_stream_round": us["engine"],
            "protocol_us_per_stream_round": round(us["service"] - us["engine"], 1)}


def load_package(root: Path) -> None:
    """Import the rtsr package of the checkout at `root` in place of the one imported now (its
    folders mapped as pyproject.toml maps them), so that two versions run in one process."""
    for name in [m for m in sys.modules if m == "rtsr" or m.startswith("rtsr.")]:
        del sys.modules[name]
    made = []
    for name, folder in (("rtsr", "rtsr"), ("rtsr.kernels", "kernels"), ("rtsr.models", "models")):
        spec = importlib.util.spec_from_file_location(name, root / folder / "__init__.py",
                                                      submodule_search_locations=[str(root / folder)])
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        made.append((spec, module))
    for spec, module in made[1:]:
        setattr(made[0][1], spec.name.split(".")[1], module)
    for spec, module in reversed(made):
        spec.loader.exec_module(module)


def versus(old: Path, n_streams: int, n_rounds: int, warmup: int, repeats: int) -> dict:
    """This checkout and the one at `old`, each with its own glue_bench, run after run in one
    process (this VM's speed moves +-2x from minute to minute): the median of each, and of the
    ratios of runs side by side."""
    runs: dict[str, list[dict]] = {"new": [], "old": []}
    for _ in range(repeats):
        for label, root in (("old", old), ("new", HERE)):
            load_package(root)
            spec = importlib.util.spec_from_file_location(f"glue_bench_{label}", root / "benchmarks" / "glue_bench.py")
            bench = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(bench)
            runs[label].append(bench.rounds(n_streams, n_rounds, warmup))
    us = {label: [r["us_per_stream_round"] for r in rs] for label, rs in runs.items()}
    return {"streams": n_streams, "rounds": n_rounds, "us_per_stream_round": statistics.median(us["new"]),
            "versus": str(old), "us_per_stream_round_versus": statistics.median(us["old"]),
            "speedup_median": round(statistics.median(o / n for o, n in zip(us["old"], us["new"], strict=True)), 2),
            "runs": runs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--rounds", type=int, default=50, help="timed rounds of 20 ms")
    p.add_argument("--warmup", type=int, default=100, help="rounds before timing (the tracker decides in these)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--band-limited", type=float, metavar="HZ",
                   help="low-pass the test signal at HZ: the tracker lowers the band and watches it for ~10 s")
    p.add_argument("--waves", type=int, default=1,
                   help="step each round's streams in this many random parts (a server's polls)")
    p.add_argument("--versus", type=Path, metavar="DIR",
                   help="also time the checkout at DIR (e.g. `git worktree add DIR <commit>`), run after run")
    p.add_argument("--repeats", type=int, default=3, help="with --versus: runs of each")
    p.add_argument("--service", action="store_true",
                   help="time the streams through `rtsr serve`'s protocol (socket-free) beside the engine alone")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.service:
        r = service_rounds(args.streams, args.rounds, args.warmup)
        print(json.dumps(r) if args.json else
              f"{r['streams']} streams, {r['rounds']} rounds, per stream per round: the service "
              f"{r['service_us_per_stream_round']} us, the engine alone {r['engine_us_per_stream_round']} us, "
              f"the protocol {r['protocol_us_per_stream_round']} us")
        return
    if args.versus:
        if args.band_limited or args.waves != 1:
            p.error("--band-limited and --waves are not timed --versus (an older glue_bench has neither)")
        r = versus(args.versus.resolve(), args.streams, args.rounds, args.warmup, args.repeats)
        print(json.dumps(r) if args.json else
              f"{r['streams']} streams: {r['us_per_stream_round']} us per stream per round here, "
              f"{r['us_per_stream_round_versus']} at {r['versus']} (median of {args.repeats} runs each; "
              f"{r['speedup_median']}x side by side)")
        return
    r = rounds(args.streams, args.rounds, args.warmup, args.band_limited, args.waves)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['streams']} streams, {r['rounds']} rounds: {r['us_per_stream_round']} us per stream per round "
          f"({r['us_per_stream_round_warmup']} while the band tracker decides); whole rounds from the first, "
          "ms: " + ", ".join(f"{q} {v}" for q, v in r["round_ms"].items()))
    for stage, us in r["stages_us_per_stream_round"].items():
        print(f"  {stage}: {us} us")


if __name__ == "__main__":
    main()
