"""Backend selection: explicit names fail loudly, auto falls back with a logged reason."""

import logging
import os
import time

import numpy as np
import pytest
import torch

from rtsr import SuperResModel, Upscaler, backends
from rtsr.backends import BackendUnavailable, apply_backend
from rtsr.engine import Stream
from rtsr.features import N_MELS
from rtsr.graphs import GRAPH_AFTER, GRAPH_MAX_FRAMES, GraphedRun
from rtsr.models.nets import Denoiser, Vocoder


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path, monkeypatch):
    """ONNX exports go to a fresh cache folder per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "rtsr" / "onnx"


def test_auto_on_cpu_is_onnx_and_falls_back_to_eager_without_it(monkeypatch, caplog):
    assert apply_backend(SuperResModel.random(), "auto") == "onnx"
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="rtsr.backends"):
        assert apply_backend(SuperResModel.random(seed=1), "auto") == "eager"
    assert "onnx unavailable" in caplog.text


def test_onnx_streams_equal_to_eager_and_reuses_its_export(onnx_cache):
    """A long stream in 20 ms hops and an offline upscale, two streams batched: equal to eager
    within 1e-4 of the peak; the export is made once per weights and found again."""
    x = (0.1 * np.random.default_rng(0).standard_normal(16000 * 4)).astype(np.float32)
    eager = Upscaler(SuperResModel.random(seed=3))
    onnx = Upscaler(SuperResModel.random(seed=3))
    assert apply_backend(onnx.model, "onnx") == "onnx"
    exports = sorted(onnx_cache.glob("*.onnx"))
    assert [p.name.split("-")[0] for p in exports] == ["hop"]  # the whole hop, one graph
    ref = eager.upscale(x, 16000)
    np.testing.assert_allclose(onnx.upscale(x, 16000), ref, atol=1e-4 * np.abs(ref).max())
    a, b = eager.stream(16000), onnx.stream(16000)
    ya = np.concatenate([a.feed(x[i:i + 320]) for i in range(0, len(x), 320)] + [a.flush()])
    yb = np.concatenate([b.feed(x[i:i + 320]) for i in range(0, len(x), 320)] + [b.flush()])
    np.testing.assert_allclose(yb, ya, atol=1e-4 * np.abs(ya).max())
    mtimes = [p.stat().st_mtime_ns for p in exports]
    again = SuperResModel.random(seed=3)
    apply_backend(again, "onnx")
    assert [p.stat().st_mtime_ns for p in exports] == mtimes and len(list(onnx_cache.glob("hop-*.onnx"))) == 1
    assert len(list(onnx_cache.glob("long-hop-*.onnx"))) == 1  # the offline upscale's long hops: their own graph
    other = SuperResModel.random(seed=4)  # other weights: other files
    apply_backend(other, "onnx")
    assert len(list(onnx_cache.glob("hop-*.onnx"))) == 2


@pytest.mark.parametrize("name", ["cudagraph", "compile-cudagraph", "tensorrt"])
def test_gpu_backends_refuse_a_cpu_model(name):
    with pytest.raises(BackendUnavailable, match="CUDA"):
        apply_backend(SuperResModel.random(), name)


def test_unknown_backend():
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        apply_backend(SuperResModel.random(), "magic")


def test_auto_falls_back_with_a_reason(monkeypatch, caplog):
    monkeypatch.setattr(backends, "auto_order", lambda device: ("tensorrt", "eager"))
    model = SuperResModel.random()
    den = model.denoiser
    with caplog.at_level(logging.WARNING, logger="rtsr.backends"):
        assert apply_backend(model, "auto") == "eager"
    assert "tensorrt unavailable" in caplog.text and "CUDA" in caplog.text
    assert model.denoiser is den  # the failed candidate left nothing behind


@pytest.mark.skipif(not os.environ.get("RTSR_SLOW"),
                    reason="Inductor compiles offline hops' graphs too: ~45 s cold on 2 cores; RTSR_SLOW=1")
def test_compile_matches_eager():
    x = (0.05 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32)
    ref = Upscaler(SuperResModel.random()).upscale(x, 16000)
    model = SuperResModel.random()
    apply_backend(model, "compile")
    y = Upscaler(model).upscale(x, 16000)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_onnx_regression_model_at_every_shape_and_its_fixed_shape_sessions(onnx_cache):
    """A one-pass regression (no noise input in its graph) equals eager at every (batch, frames)
    shape, whether the dynamic session runs it or, once a shape comes many calls in a row, one of
    its own (shapes that alternate never get one)."""
    from rtsr.onnx_backend import STATIC_AFTER, STATIC_SESSIONS

    eager, onnx = SuperResModel.random(seed=5, steps=0), SuperResModel.random(seed=5, steps=0)
    apply_backend(onnx, "onnx")
    shapes = [(b, t) for b in (1, 2, 3) for t in (1, 4)]
    for batch, frames in shapes * STATIC_AFTER + [s for s in shapes for _ in range(STATIC_AFTER)]:
        cond, low = torch.randn(batch, N_MELS, frames), torch.randn(batch, N_MELS, frames)
        cutoff, noise = torch.full((frames,), 6000.0), torch.zeros(batch, N_MELS, frames)
        ref = eager.run(eager.new_state(batch), cond, low, cutoff, noise)
        got = onnx.run(onnx.new_state(batch), cond, low, cutoff, noise)
        assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max())
        if not onnx.run.static and not onnx.run.making:
            assert onnx.run.run_length < STATIC_AFTER  # alternating shapes: no session of their own
        for thread in list(onnx.run.making.values()):
            thread.join()  # made on a thread of its own; wait here so the next calls use it
    assert list(onnx.run.static) == shapes[:STATIC_SESSIONS]


def test_file_sized_hops_always_take_the_dynamic_session(onnx_cache):
    """A fixed-shape session computes ~1e-5 apart from the dynamic one, so hops longer than a live
    one (a file's 500 ms hops) never get one: a file's bits must not depend on what ran before."""
    from rtsr.onnx_backend import LIVE_FRAMES, STATIC_AFTER

    model = SuperResModel.random(seed=5, steps=0)
    apply_backend(model, "onnx")
    for _ in range(2 * STATIC_AFTER):
        assert model.run.session_for(1, LIVE_FRAMES + 1) is model.run.dynamic
    assert not model.run.making and not model.run.static


def _flagged(seed: int) -> SuperResModel:
    """A tiny one-pass network with the codec flag, its flag weights set so that the flag matters."""
    torch.manual_seed(seed)
    den = Denoiser(32, 2, emb_dim=32, flags=1)
    with torch.no_grad():
        den.inp.weight[:, -1] = 1.0
    return SuperResModel(den, Vocoder(32, 2), 0)


def test_the_codec_flag_reaches_the_network_per_stream_on_every_backend(onnx_cache):
    """A stream's flag (`new_state(lossy=...)`) is one row per channel, kept apart in a batch of
    streams, and the ONNX graph takes it as an input of its own."""
    eager, onnx = _flagged(7), _flagged(7)
    apply_backend(onnx, "onnx")
    cond = torch.randn(1, N_MELS, 4)
    cutoff, noise = torch.full((4,), 6000.0), torch.zeros(1, N_MELS, 4)
    clean, lossy = (eager.run(eager.new_state(1, lossy=f), cond, cond, cutoff, noise) for f in (False, True))
    assert not torch.allclose(clean, lossy)
    for f, ref in ((False, clean), (True, lossy)):
        got = onnx.run(onnx.new_state(1, lossy=f), cond, cond, cutoff, noise)
        assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max())
    both = eager.run_slots([eager.bank.join(1, lossy=True), eager.bank.join(1)], torch.cat([cond, cond]),
                           torch.cat([cond, cond]), cutoff.expand(2, -1), torch.cat([noise, noise]))
    torch.testing.assert_close(both, torch.cat([lossy, clean]))
    # an engine stream of a lossy file says so for each channel
    assert Stream(eager, 44100, channels=2, fill_holes=True).model_state.lossy.tolist() == [1.0, 1.0]
    assert Stream(eager, 44100).model_state.lossy.tolist() == [0.0]


def test_a_process_ending_while_a_fixed_shape_session_is_made_exits_cleanly(onnx_cache):
    """`rtsr upscale` on a short file used to end with status 134 ("terminate called without an
    active exception"): the interpreter tore down under a session still being made on its thread."""
    import subprocess
    import sys

    script = ("from rtsr import SuperResModel\nfrom rtsr.backends import apply_backend\n"
              "from rtsr.onnx_backend import STATIC_AFTER\n"
              "m = SuperResModel.random(seed=5, steps=0)\napply_backend(m, 'onnx')\n"
              "for _ in range(STATIC_AFTER):\n    m.run.session_for(1, 4)\n"
              "assert m.run.making\nprint('exiting')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "exiting"), done.stderr[-2000:]


def test_a_fixed_shape_session_that_cannot_be_made_leaves_the_dynamic_one(onnx_cache, monkeypatch):
    from rtsr.onnx_backend import STATIC_AFTER

    model = SuperResModel.random(seed=5, steps=0)
    apply_backend(model, "onnx")
    run = model.run

    def refuse(dims):
        raise RuntimeError("no memory")

    monkeypatch.setattr(run, "_session", refuse)
    with pytest.warns(UserWarning, match="no fixed-shape session"):
        for _ in range(STATIC_AFTER):
            run.session_for(1, 4)
        for thread in list(run.making.values()):
            thread.join()
    assert not run.making and run.session_for(1, 4) is run.dynamic


def _hop_inputs(batch: int, frames: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cond, low, noise = (torch.randn(batch, N_MELS, frames, generator=g) for _ in range(3))
    return cond, low, 2000 + 10000 * torch.rand(batch, frames, generator=g), noise


def test_compile_reuses_one_graph_for_every_batch_size():
    """Compiled at batch 1 (warm-up), batches 3, 5 and 1 again run without one recompile (on an
    H200 the batch size changing hit dynamo's recompile limit) and equal eager within 1e-4."""
    import torch._dynamo

    torch._dynamo.reset()
    eager, compiled = SuperResModel.random(seed=3), SuperResModel.random(seed=3)
    assert apply_backend(compiled, "compile") == "compile"
    for i, batch in enumerate((1, 3, 5, 1)):
        states = compiled.new_state(batch), eager.new_state(batch)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            for hop in range(2):  # the state carried from hop to hop
                inputs = _hop_inputs(batch, seed=10 * i + hop)
                got, ref = compiled.run(states[0], *inputs), eager.run(states[1], *inputs)
                assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_compiled_networks_in_the_graphed_hop_equal_eager_in_every_bucket_without_recompiles():
    """`compile-cudagraph`'s step (its graph's step run, not replayed, on a CPU): the compiled
    networks inside the graphed hop, with its gather and masked write-back around them, equal
    eager at buckets of 1, 4 and 8 rows with the state carried, compiled once (the first bucket)."""
    import torch._dynamo

    from rtsr.backends import Compiled

    torch._dynamo.reset()
    compiled, eager = SuperResModel.random(seed=3), SuperResModel.random(seed=3)
    compiled.denoiser, compiled.vocoder = Compiled(compiled.denoiser), Compiled(compiled.vocoder)
    run = GraphedRun(compiled, capture=False, graph_after=1)
    for i, batch in enumerate((1, 3, 8, 1)):
        states = compiled.new_state(batch), eager.new_state(batch)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            for hop in range(2):
                inputs = _hop_inputs(batch, seed=10 * i + hop)
                got, ref = run(states[0], *inputs), eager.run(states[1], *inputs)
                assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert sorted(run.graphs) == [(1, 4), (4, 4), (8, 4)]


@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize(("steps", "guidance"), [(0, 1.0), (2, 1.0), (2, 1.5)])
def test_graphed_hops_equal_eager_in_every_bucket_with_the_state_carried(steps, guidance, capture, request):
    """`cudagraph`'s hop (rtsr.graphs), its step run instead of replayed as on a CPU, or captured
    and replayed as a CUDA graph (tests/fake_cuda_graphs.py) for a call given its state: batches of
    1, 3, 5, 1 and 8 rows (buckets of 1, 4, 8: spare rows computing on what they hold), three
    hops each with the state carried, a regression, a sampler and a guided sampler (two branches
    per row), the codec flag told row by row: each output equal to eager within 1e-5 of the
    peak, one graph per bucket."""
    def flagged() -> SuperResModel:
        torch.manual_seed(3)
        return SuperResModel(Denoiser(32, 2, emb_dim=32, flags=1), Vocoder(32, 2), steps, guidance)

    graphed, eager = flagged(), flagged()
    made = request.getfixturevalue("fake_cuda_graphs") if capture else []
    run = GraphedRun(graphed, capture=capture, graph_after=1)
    for i, batch in enumerate((1, 3, 5, 1, 8)):
        states = graphed.new_state(batch), eager.new_state(batch)
        for state in states:
            state.lossy[i % 2::2] = 1.0
        for hop in range(3):
            inputs = _hop_inputs(batch, seed=10 * i + hop)
            got, ref = run(states[0], *inputs), eager.run(states[1], *inputs)
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert sorted(run.graphs) == [(1, 4), (4, 4), (8, 4)]
    assert [g.replays for g in made] == ([6, 3, 6] if capture else [])  # hops run in each bucket


def test_a_hop_that_waits_for_the_device_cannot_be_captured(fake_cuda_graphs, monkeypatch):
    """The capture stand-in refuses what a real capture refuses, a host sync inside the hop (a
    value read back, a boolean mask's indexing), so the graph tests above prove the hop has none."""
    model = SuperResModel.random(seed=3)
    hop = model.hop
    for sync in (lambda re: float(re.sum()), lambda re: re[re > 0]):
        monkeypatch.setattr(model, "hop", lambda *a, sync=sync: (sync(hop(*a)[0]), hop(*a))[1])
        with pytest.raises(RuntimeError, match="waits for the device"):
            GraphedRun(model, capture=True, graph_after=1)(model.new_state(2), *_hop_inputs(2))


def test_a_graphed_hop_that_fails_leaves_the_state_and_long_hops_run_eagerly(monkeypatch):
    """A call that raises inside the step hands back nothing: the caller's caches are the ones it
    gave (the bank writes back only after a call returns). A hop over GRAPH_MAX_FRAMES frames
    (offline) makes no graph and equals eager."""
    model, eager = SuperResModel.random(seed=3), SuperResModel.random(seed=3)
    run = GraphedRun(model, capture=False, graph_after=1)
    state = model.new_state(2)
    run(state, *_hop_inputs(2))
    before = {k: t.clone() for k, t in state.vocoder.items()}
    hop = model.hop
    monkeypatch.setattr(model, "hop", lambda *a: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        run(state, *_hop_inputs(2, seed=1))
    assert all(torch.equal(state.vocoder[k], t) for k, t in before.items())
    monkeypatch.setattr(model, "hop", hop)
    frames = GRAPH_MAX_FRAMES + 8
    got = run(model.new_state(2), *_hop_inputs(2, frames))
    torch.testing.assert_close(got, eager.run(eager.new_state(2), *_hop_inputs(2, frames)))
    assert list(run.graphs) == [(2, 4)]


def test_a_hop_shape_is_graphed_only_once_it_repeats():
    """A shape runs eagerly until it has been asked for GRAPH_AFTER times (an offline segment's
    last short hop is a one-off, not worth a capture), then as a graph: for a call given its state
    and for a bank's rows alike, every output equal to eager's."""
    model, eager = SuperResModel.random(seed=3), SuperResModel.random(seed=3)
    run = model.run = GraphedRun(model, capture=False)
    state, own = model.new_state(2), eager.new_state(2)
    slots, twins = [model.bank.join(1) for _ in range(2)], [eager.bank.join(1) for _ in range(2)]
    for hop in range(GRAPH_AFTER):
        assert not run.graphs and not run.banked
        inputs = _hop_inputs(2, seed=hop)
        torch.testing.assert_close(run(state, *inputs), eager.run(own, *inputs))
        torch.testing.assert_close(model.run_slots(slots, *inputs), eager.run_slots(twins, *inputs))
    assert list(run.graphs) == list(run.banked) == [(2, 4)]
    run(model.new_state(1), *_hop_inputs(1, seed=9))  # another shape, once
    assert list(run.graphs) == [(2, 4)]


def test_auto_on_cuda_takes_the_fastest_candidate_that_matches_eager(monkeypatch, caplog):
    """Where candidates are timed (CUDA; mocked here), `auto` runs each, refuses one whose output
    is off by 1 % or that fails, and takes the fastest of the rest, not the first in order."""
    def fake_apply(model, name):
        if name == "broken":
            raise BackendUnavailable("no such device")
        if name == "wrong":  # fastest, and 1 % off
            model.vocoder = _Altered(model.vocoder, scale=1.01)
        else:
            model.denoiser = _Altered(model.denoiser, sleep={"fast": 0.001, "eager": 0.01}[name])

    monkeypatch.setattr(backends, "measures", lambda device: True)
    monkeypatch.setattr(backends, "auto_order", lambda device: ("broken", "wrong", "eager", "fast"))
    monkeypatch.setattr(backends, "_apply", fake_apply)
    model = SuperResModel.random()
    with caplog.at_level(logging.INFO, logger="rtsr.backends"):
        assert apply_backend(model, "auto") == "fast"
    assert model.denoiser.sleep == 0.001
    assert "broken unavailable" in caplog.text and "wrong unavailable" in caplog.text
    assert "differs from eager" in caplog.text and "-> fast" in caplog.text
    eager = SuperResModel.random()
    inputs = _hop_inputs(2)
    torch.testing.assert_close(model.run(model.new_state(2), *inputs), eager.run(eager.new_state(2), *inputs))


class _Altered:
    """A network as a backend stand-in: slower by `sleep` seconds a call, its output scaled."""

    def __init__(self, net, sleep: float = 0.0, scale: float = 1.0):
        self.net, self.sleep, self.scale = net, sleep, scale

    def __call__(self, *args, **kwargs):
        time.sleep(self.sleep)
        return self.net(*args, **kwargs) * self.scale

    def __getattr__(self, name: str):
        return getattr(self.net, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["compile", "cudagraph", "compile-cudagraph", "auto"])
def test_cuda_backends_equal_eager_over_hops_at_every_batch_size(name):
    """On the device: each backend (auto: whichever it proves fastest) runs hops with the state
    carried at batches 1, 3, 5 and 1 again, equal to eager on the CPU within 1e-4 of the peak."""
    model, eager = SuperResModel.random(seed=3, device="cuda"), SuperResModel.random(seed=3)
    assert apply_backend(model, name) in backends.BACKENDS
    for i, batch in enumerate((1, 3, 5, 1)):
        states = model.new_state(batch), eager.new_state(batch)
        for hop in range(3):
            inputs = _hop_inputs(batch, seed=10 * i + hop)
            got, ref = model.run(states[0], *inputs), eager.run(states[1], *inputs)
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_onnx_int8_is_its_own_choice_and_a_streams_bits_are_its_own(onnx_cache):
    """`onnx-int8`: never what `auto` picks; close to eager (int8 rounding); one quantized graph
    for every hop length and batch, so a stream's output is the same bits streamed in 20 ms
    hops, upscaled whole, or batched with another stream (fixed scales: a batch partner's loud
    input does not change its rounding)."""
    from rtsr.onnx_backend import STATIC_AFTER

    x = (0.1 * np.random.default_rng(0).standard_normal(16000 * 3)).astype(np.float32)
    eager, int8 = Upscaler(SuperResModel.random(seed=3, steps=0)), Upscaler(SuperResModel.random(seed=3, steps=0))
    assert apply_backend(int8.model, "onnx-int8") == "onnx-int8"
    assert [p.name.split("-")[0] for p in sorted(onnx_cache.glob("*.onnx"))] == ["hop", "int8v1"]
    ref, got = eager.upscale(x, 16000), int8.upscale(x, 16000)
    assert 0 < np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()
    s = int8.stream(16000)
    streamed = np.concatenate([s.feed(x[i:i + 320]) for i in range(0, len(x), 320)] + [s.flush()])
    np.testing.assert_array_equal(streamed, got)
    assert not int8.model.run.static and not int8.model.run.making  # STATIC_AFTER hops in a row: still none
    assert len(x) // 320 > STATIC_AFTER
    g = torch.Generator().manual_seed(1)
    cond, low = torch.randn(2, N_MELS, 4, generator=g), torch.randn(2, N_MELS, 4, generator=g)
    cond[1] *= 30  # the partner: far louder than anything calibrated
    cutoff, noise = torch.full((4,), 6000.0), torch.zeros(2, N_MELS, 4)
    both = int8.model.run(int8.model.new_state(2), cond, low, cutoff, noise)
    alone = int8.model.run(int8.model.new_state(1), cond[:1], low[:1], cutoff, noise[:1])
    assert torch.equal(both[:1], alone)
    assert apply_backend(SuperResModel.random(seed=3, steps=0), "auto") == "onnx"
