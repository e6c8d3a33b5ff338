"""Batching hops of many streams into one model call gives each stream its unbatched output."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rtsr import SuperResModel, Upscaler
from rtsr.batch import step
from rtsr.cutoff import Band
from rtsr.engine import Stream


def test_batched_streams_equal_separate_runs():
    model = SuperResModel.random()
    rng = np.random.default_rng(3)
    specs = [(16000, 1), (8000, 2), (44100, 1), (16000, 1)]
    inputs = [(0.05 * rng.standard_normal((int(sr * 0.4), ch))).astype(np.float32) for sr, ch in specs]
    streams = [Stream(model, sr, ch, 20.0, seed=k) for k, (sr, ch) in enumerate(specs)]
    outs = [[] for _ in streams]
    for pos in range(0, 8000, 700):  # uneven blocks, the same wall-clock share for every stream
        for s, x in zip(streams, inputs, strict=True):
            s.push(x[pos * s.input_sr // 16000:(pos + 700) * s.input_sr // 16000])
        for o, y in zip(outs, step(streams), strict=True):
            o.append(y)
    for s in streams:
        s.push_end()
    for o, y in zip(outs, step(streams), strict=True):
        o.append(y)
    for k, ((sr, _), x) in enumerate(zip(specs, inputs, strict=True)):
        alone = Upscaler(model, seed=k).upscale(x, sr)
        got = np.concatenate(outs[k])
        assert got.shape == alone.shape
        assert np.abs(got - alone).max() <= 1e-5 * np.abs(alone).max()


def test_guided_teacher_refuses_batching():
    model = SuperResModel.random()
    model.guidance = 2.0
    s = Stream(model, 16000, 1)
    s.push(np.zeros(16000, np.float32))
    with pytest.raises(ValueError, match="distilled"):
        step([s, s])


def test_a_passthrough_stream_in_a_batch_gets_its_output_and_holds_nothing():
    """A full-band 48 kHz stream beside a model stream: batch.step hands back its resampled audio
    each time (it used to drop it and let `_through` grow)."""
    model = SuperResModel.random(steps=1)
    full = Stream(model, 48000, 1, 20.0, cutoff=Band(24000.0, "given"))
    other = Stream(model, 16000, 1, 20.0)
    x = (0.1 * np.random.default_rng(0).standard_normal(48000)).astype(np.float32)
    got = []
    for i in range(0, 48000, 960):
        full.push(x[i:i + 960])
        other.push(x[i // 3:i // 3 + 320])
        got.append(step([full, other])[0])
        assert not full._through
    assert sum(len(g) for g in got) > 40000


def test_the_glue_benchmark_prints_its_per_stream_cost():
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "glue_bench.py"
    r = subprocess.run([sys.executable, str(bench), "--streams", "2", "--rounds", "2", "--warmup", "1", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["us_per_stream_round"] > 0
