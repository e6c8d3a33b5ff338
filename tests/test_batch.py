"""Batching hops of many streams into one model call gives each stream its unbatched output."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rtsr import SuperResModel, Upscaler
from rtsr.batch import StepFailed, step
from rtsr.cutoff import Band
from rtsr.engine import Stream


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_batched_streams_equal_separate_runs(guidance):
    """A distilled model, and a teacher with guidance (its two branches batched side by side)."""
    model = SuperResModel.random()
    model.guidance = guidance
    rng = np.random.default_rng(3)
    specs = [(16000, 1), (8000, 2), (44100, 1), (16000, 1)]
    inputs = [(0.05 * rng.standard_normal((int(sr * 0.4), ch))).astype(np.float32) for sr, ch in specs]
    streams = [Stream(model, sr, ch, 20.0, seed=k) for k, (sr, ch) in enumerate(specs)]
    outs = stepped(streams, inputs, 8000, 700)  # uneven blocks, the same wall-clock share for every stream
    for k, ((sr, _), x) in enumerate(zip(specs, inputs, strict=True)):
        alone = Upscaler(model, seed=k).upscale(x, sr)
        assert outs[k].shape == alone.shape
        assert np.abs(outs[k] - alone).max() <= 1e-5 * np.abs(alone).max()


def stepped(streams: list[Stream], inputs: list[np.ndarray], until: int, block: int) -> list[np.ndarray]:
    """Each stream's output, its input pushed in blocks (`block` samples at 16 kHz, as many
    seconds at its own rate) up to `until` and then its end, all stepped together each time."""
    outs: list[list[np.ndarray]] = [[] for _ in streams]
    for pos in range(0, until, block):
        for s, x in zip(streams, inputs, strict=True):
            s.push(x[pos * s.input_sr // 16000:(pos + block) * s.input_sr // 16000])
        for o, y in zip(outs, step(streams), strict=True):
            o.append(y)
    for s in streams:
        s.push_end()
    for o, y in zip(outs, step(streams), strict=True):
        o.append(y)
    return [np.concatenate(o) for o in outs]


def test_a_passthrough_stream_in_a_batch_gets_its_output_and_holds_nothing():
    """A full-band 48 kHz stream beside a model stream: batch.step hands back its resampled audio
    each time (it used to drop it and let its pending output grow)."""
    model = SuperResModel.random(steps=1)
    full = Stream(model, 48000, 1, 20.0, cutoff=Band(24000.0, "given"))
    other = Stream(model, 16000, 1, 20.0)
    x = (0.1 * np.random.default_rng(0).standard_normal(48000)).astype(np.float32)
    got = []
    for i in range(0, 48000, 960):
        full.push(x[i:i + 960])
        other.push(x[i // 3:i // 3 + 320])
        got.append(step([full, other])[0])
        assert not full._ready
    assert sum(len(g) for g in got) > 40000


@pytest.mark.parametrize("mode", ["alone", "versus", "service"])
def test_the_glue_benchmark_prints_its_per_stream_cost(mode):
    """It runs (beside another checkout too, here this one again; through the service's protocol)
    and prints the keys."""
    root = Path(__file__).resolve().parents[1]
    extra = {"alone": [], "versus": ["--versus", str(root), "--repeats", "1"], "service": ["--service"]}[mode]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "glue_bench.py"), "--streams", "2", "--rounds", "2",
                        "--warmup", "1", "--json", *extra], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    if mode == "service":
        assert out["service_us_per_stream_round"] > 0 and out["engine_us_per_stream_round"] > 0
        return
    versus = mode == "versus"
    assert out["us_per_stream_round"] > 0 and (not versus or out["us_per_stream_round_versus"] > 0)
    if not versus:
        assert 0 < out["round_ms"]["p50"] <= out["round_ms"]["p99"] <= out["round_ms"]["max"]


@pytest.mark.parametrize(("fail_in", "from_call"), [("tracker", 3), ("decision", 1), ("merge", 3)])
def test_a_failing_stream_leaves_the_others_whole(fail_in, from_call, monkeypatch):
    """One stream's part of a batched round fails (its band tracker taking its samples, or making
    the band rows of a round with a decision; its merge, done for all the streams of a bank at
    once, then stream by stream to find the culprit): the
    round goes on for the others, StepFailed names it, and their samples come out of their next
    step (or feed), neither short nor shifted."""
    import rtsr.engine as engine

    model = SuperResModel.random(steps=1)
    rng = np.random.default_rng(5)
    specs = [(16000, 1), (8000, 2), (16000, 1), (22050, 1), (16000, 2)]
    inputs = [(0.05 * rng.standard_normal((int(sr * 0.5), ch))).astype(np.float32) for sr, ch in specs]
    streams = [Stream(model, sr, ch, 20.0, seed=k) for k, (sr, ch) in enumerate(specs)]
    calls = {"n": 0}
    real = {"merge": engine.merged_spectra, "tracker": streams[1].cutoff.take,
            "decision": streams[1].band_rows}[fail_in]

    def breaks_from_a_call(*args, **kwargs):
        if fail_in == "merge" and not (args[1] is streams[1].hops.spec and streams[1].hop_row in args[0]):
            return real(*args, **kwargs)  # the merge fails only where stream 1's rows are in it
        calls["n"] += 1
        if calls["n"] >= from_call:
            raise ValueError("injected")
        return real(*args, **kwargs)
    if fail_in == "merge":
        monkeypatch.setattr(engine, "merged_spectra", breaks_from_a_call)
    elif fail_in == "tracker":
        streams[1].cutoff.take = breaks_from_a_call
    else:
        streams[1].band_rows = breaks_from_a_call
    outs, live, failures = [[] for _ in streams], list(range(len(streams))), 0
    for pos in range(0, 8000, 640):  # two hops per round: a failure lands between a stream's hops
        for i in live:
            streams[i].push(inputs[i][pos * specs[i][0] // 16000:(pos + 640) * specs[i][0] // 16000])
        try:
            for i, y in zip(live, step([streams[i] for i in live]), strict=True):
                outs[i].append(y)
        except StepFailed as e:
            failures += 1
            assert [live[j] for j in e.failed] == [1]
            live.remove(1)
            with pytest.raises(RuntimeError, match="failed earlier"):
                streams[1].feed(np.zeros((0, 2), np.float32))
    assert failures == 1
    for i in live:
        streams[i].push_end()
    for i, y in zip(live, step([streams[i] for i in live]), strict=True):
        outs[i].append(y)
    for i in live:
        alone = Upscaler(model, seed=i).upscale(inputs[i], specs[i][0])
        got = np.concatenate(outs[i])
        assert got.shape == alone.shape
        assert np.abs(got - alone).max() <= 1e-5 * np.abs(alone).max()


def test_a_failed_model_call_moves_no_stream():
    """The batched model call fails once, on the second hop of a round: no stream has advanced past
    its first hop, whose samples wait in it, and each stream's next feed alone (as the server falls
    back to) gives the rest: neither short nor shifted."""
    model = SuperResModel.random(steps=1)
    x = (0.05 * np.random.default_rng(6).standard_normal((8000, 1))).astype(np.float32)
    streams = [Stream(model, 16000, 1, 20.0, seed=k) for k in range(3)]
    real, outs, calls = model.run_slots, [[] for _ in streams], []

    def fails_once(*args):
        calls.append(len(calls))
        if len(calls) == 9:  # the second of a round (the first round makes one call)
            raise ValueError("injected")
        return real(*args)
    model.run_slots = fails_once
    for pos in range(0, 8000, 640):  # two hops per round
        for s in streams:
            s.push(x[pos:pos + 640])
        try:
            for o, y in zip(outs, step(streams), strict=True):
                o.append(y)
        except ValueError:
            for o, s in zip(outs, streams, strict=True):
                o.append(s.feed(np.zeros((0, 1), np.float32)))
    model.run_slots = real
    assert len(calls) > 9
    for k, (o, s) in enumerate(zip(outs, streams, strict=True)):
        alone = Upscaler(model, seed=k).upscale(x, 16000)
        got = np.concatenate(o + [s.flush()])
        assert got.shape == alone.shape
        assert np.abs(got - alone).max() <= 1e-5 * np.abs(alone).max()


def test_a_block_reused_by_its_caller_after_push_changes_nothing():
    """Input waits for the round to be resampled, so push keeps a copy: a caller that refills its
    buffer (an audio callback's) does not change what was pushed."""
    model = SuperResModel.random(steps=1)
    x = (0.05 * np.random.default_rng(8).standard_normal((4800, 1))).astype(np.float32)
    s = Stream(model, 16000, 1, 20.0)
    buf, out = np.empty((320, 1), np.float32), []
    for i in range(0, 4800, 320):
        buf[:] = x[i:i + 320]
        s.push(buf)
        buf[:] = 1.0
        out.append(step([s])[0])
    s.push_end()
    out.append(step([s])[0])
    alone = Upscaler(model).upscale(x, 16000)
    assert np.abs(np.concatenate(out) - alone).max() <= 1e-5 * np.abs(alone).max()


def test_when_the_trackers_shared_fft_fails_each_tracker_commits_its_own(monkeypatch):
    """The deciding trackers' frames go through one FFT call; if it fails, nothing has been
    counted, each tracker commits alone, and every stream's output is still its offline one."""
    import rtsr.engine as engine

    def fails(*args):
        raise MemoryError("injected")
    monkeypatch.setattr(engine, "due_spectra", fails)
    model = SuperResModel.random(steps=1)
    rng = np.random.default_rng(6)
    specs = [(16000, 1), (8000, 2), (44100, 1)]
    inputs = [(0.05 * rng.standard_normal((int(sr * 1.6), ch))).astype(np.float32) for sr, ch in specs]
    streams = [Stream(model, sr, ch, 20.0, seed=k) for k, (sr, ch) in enumerate(specs)]
    outs = stepped(streams, inputs, 25600, 640)
    assert all(s.cutoff.spectrum is None or s.cutoff.spectrum.active for s in streams)
    for k, (x, (sr, _)) in enumerate(zip(inputs, specs, strict=True)):
        alone = Upscaler(model, seed=k).upscale(x, sr)
        assert outs[k].shape == alone.shape and np.abs(outs[k] - alone).max() <= 1e-4 * np.abs(alone).max()
