"""`rtsr live` without a sound card: the ring buffer, the worker and the callbacks driven by a fake
device (a loop that calls them as PortAudio would), an injected stall, and the PortAudio hint.

The fake device's clock is the loop itself, so these tests are exact and do not depend on the
machine's load; one test runs the real worker thread against a paced fake device.
"""

import ctypes
import importlib.abc
import json
import os
import shutil
import signal as signals
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from rtsr import bench
from rtsr.cli import main
from rtsr.engine import Stream
from rtsr.live import LiveEngine, Passthrough, Ring, choose_rate, stop_signals
from rtsr.model import SuperResModel
from rtsr.resample import resample

SR_IN, TICK_IN, TICK_OUT = 16000, 160, 480  # 10 ms device blocks at 16 kHz in, 48 kHz out
HOP_IN, TARGET = 320, 960  # 20 ms engine hop, 20 ms output buffer


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return SuperResModel.random()


def signal(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((round(SR_IN * seconds), 1))).astype(np.float32)


def reference(model, x: np.ndarray) -> np.ndarray:
    """The engine's output for x fed in hops, as the worker feeds it."""
    s = Stream(model, SR_IN, 1, 20.0)
    return np.concatenate([s.feed(x[i:i + HOP_IN]) for i in range(0, len(x) // HOP_IN * HOP_IN, HOP_IN)])


def drive(eng: LiveEngine, x: np.ndarray, stall: range = range(0)) -> np.ndarray:
    """Fake device: one input and one output callback per 10 ms tick, the worker stepped after each
    input block except during `stall` (ticks); returns everything the output callback played."""
    played = []
    for k in range(len(x) // TICK_IN):
        eng.input_callback(x[k * TICK_IN:(k + 1) * TICK_IN], TICK_IN, None, None)
        if k not in stall:
            eng.step()
        out = np.full((TICK_OUT, 1), np.nan, np.float32)  # NaN: a frame the callback forgot to fill
        eng.output_callback(out, TICK_OUT, None, None)
        played.append(out)
    return np.concatenate(played)


# --- ring buffer ---------------------------------------------------------------------------------


def test_ring_is_a_bounded_fifo():
    rng = np.random.default_rng(0)
    ring, fifo, n = Ring(100, 2), [], 0
    for _ in range(500):
        if rng.random() < 0.5:
            x = rng.standard_normal((int(rng.integers(0, 80)), 2)).astype(np.float32)
            took = ring.write(x)
            assert took == min(len(x), 100 - len(fifo))
            fifo += list(x[:took])
        else:
            out = np.zeros((int(rng.integers(0, 80)), 2), np.float32)
            got = ring.read(out)
            assert got == min(len(out), len(fifo))
            np.testing.assert_array_equal(out[:got], np.array(fifo[:got]).reshape(-1, 2))
            fifo = fifo[got:]
        n += 1
        assert ring.readable == len(fifo) and ring.writable == 100 - len(fifo)
    assert ring.skip(1000) == len(fifo) and ring.readable == 0


# --- worker and callbacks with a fake device -----------------------------------------------------


def test_steady_stream_plays_the_engine_output_without_gaps(model):
    x = signal(1.0)
    eng = LiveEngine(Stream(model, SR_IN, 1, 20.0), SR_IN, 1, HOP_IN, TARGET)
    played = drive(eng, x)
    assert not np.isnan(played).any()
    assert (eng.c.underruns, eng.c.overflows, eng.c.skipped) == (0, 0, 0)
    lead = int(np.argmax(np.abs(played[:, 0]) > 0))  # silence until the buffer first reached its target
    ref = reference(model, x)
    np.testing.assert_array_equal(played[lead:], ref[:len(played) - lead])
    assert lead % TICK_OUT == 0 and 1000 * lead / 48000 <= Stream(model, SR_IN).latency_ms + 20 + 10
    assert 0 < eng.c.rtf and eng.c.audio_s == pytest.approx(1.0, abs=0.02)


def test_stall_is_counted_padded_and_recovered(model):
    x = signal(1.5, seed=1)
    eng = LiveEngine(Stream(model, SR_IN, 1, 20.0), SR_IN, 1, HOP_IN, TARGET)
    played = drive(eng, x, stall=range(50, 70))  # the worker hangs for 200 ms at 0.5 s
    assert not np.isnan(played).any()  # continuous: every callback filled every frame
    assert eng.c.underruns == 1 and eng.c.padded >= 15 * TICK_OUT
    assert np.abs(played[58 * TICK_OUT:68 * TICK_OUT]).max() == 0  # silence while stalled
    assert eng.c.skipped > 0  # the backlog was dropped ...
    assert eng.out.readable <= TARGET + TICK_OUT  # ... so the latency is back at its target
    tail = 20 * TICK_OUT  # and the last 200 ms are the engine's output, in order
    ref = reference(model, x)
    np.testing.assert_array_equal(played[-tail:], ref[eng.out._r - tail:eng.out._r])


def test_input_overflow_is_counted_not_grown(model):
    eng = LiveEngine(Stream(model, SR_IN, 1, 20.0), SR_IN, 1, HOP_IN, TARGET, ring_seconds=0.1)
    block = signal(0.01)
    for _ in range(30):  # 300 ms into a 100 ms ring, the worker never runs
        eng.input_callback(block, TICK_IN, None, None)
    assert eng.inp.readable == eng.inp.capacity and eng.c.overflows > 0
    assert eng.c.dropped_in == 30 * TICK_IN - eng.inp.capacity


def test_recording_without_playback_drops_nothing_and_adds_no_latency(model):
    """--no-play --record: 3 s of input (longer than the output ring) all recorded, nothing counted
    as dropped, and the reported latency is the engine's (it once said 2020 ms, 143040 dropped)."""
    got = []
    eng = LiveEngine(Stream(model, SR_IN, 1, 20.0), SR_IN, 1, HOP_IN, TARGET, ring_seconds=1.0,
                     record=got.append, play=False)
    x = signal(3.0)
    for i in range(0, len(x), TICK_IN):
        eng.input_callback(x[i:i + TICK_IN], TICK_IN, None, None)
        eng.step()
    assert eng.c.skipped == 0 and eng.out.readable == 0
    recorded, whole = sum(len(y) for y in got), len(x) * 48000 // SR_IN
    assert whole - eng.proc.latency_samples - 960 <= recorded <= whole  # all but the engine's delay (+ a hop)
    assert eng.latency_ms() == pytest.approx(1000 * eng.proc.latency_samples / 48000, abs=1000 * HOP_IN / SR_IN)
    eng.finish()  # the end of the run: the rest of the input, and what the engine holds back
    assert sum(len(y) for y in got) == whole and eng.c.audio_s == pytest.approx(3.0)


def test_device_status_flags_are_counted(model):
    eng = LiveEngine(Passthrough(SR_IN, 1, 0), SR_IN, 1, HOP_IN, TARGET)
    eng.input_callback(signal(0.01), TICK_IN, None, "input overflow")
    eng.output_callback(np.zeros((TICK_OUT, 1), np.float32), TICK_OUT, None, "output underflow")
    assert eng.c.device_xruns == 2 and eng.c.xruns == 2


def test_the_summarys_latency_is_the_runs_not_what_the_stop_left_in_the_rings():
    """It said 151.3 ms while the status lines had said 71-91 ms."""
    eng = LiveEngine(Passthrough(SR_IN, 1, 0), SR_IN, 1, HOP_IN, TARGET)
    for _ in range(3):
        eng.input_callback(signal(0.01), TICK_IN, None, None)
        eng.status()
    shown = sorted(eng.shown)
    for _ in range(10):  # the input device ran on after the worker stopped
        eng.input_callback(signal(0.01), TICK_IN, None, None)
    assert f"latency {shown[1]:.1f} ms (median)" in eng.summary()


def run_worker_until(eng: LiveEngine, seen: list) -> None:
    """The real worker thread given 0.1 s of input, stopped once its processor has noted something."""
    eng.start()
    eng.input_callback(signal(0.1), round(0.1 * SR_IN), None, None)
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    eng.stop()


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"), reason="needs 2 cores, Linux")
def test_the_worker_runs_torch_with_the_processs_thread_count():
    """OpenMP's thread count is per thread: the worker ran torch with a team of every core's
    threads (a new OS thread here) despite one set for the process, live at 4x bench's RTF."""
    torch.set_num_threads(1)
    started = []

    class TorchFFT:
        latency_samples = 0

        def feed(self, block: np.ndarray) -> np.ndarray:
            before = len(os.listdir("/proc/self/task"))
            torch.fft.rfft(torch.ones(4, 480))  # the engine's analysis: a few frames of 10 ms
            started.append(len(os.listdir("/proc/self/task")) - before)
            return block

    eng = LiveEngine(TorchFFT(), SR_IN, 1, HOP_IN, TARGET, play=False)
    run_worker_until(eng, started)
    assert started and started[0] == 0


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="POSIX scheduling (Linux)")
def test_the_worker_runs_ahead_of_ordinary_processes_where_allowed():
    """Other processes took the core mid-hop (a hop's wall time 1.2-1.4x its CPU time on a busy
    machine); the worker asks for real-time scheduling, and goes on without it where not allowed."""
    policies = []

    class Policy(Passthrough):
        def feed(self, block):
            policies.append(os.sched_getscheduler(0))
            return super().feed(block)

    eng = LiveEngine(Policy(SR_IN, 1, 0), SR_IN, 1, HOP_IN, TARGET, play=False)
    run_worker_until(eng, policies)
    assert eng.error is None and policies
    assert policies[0] == (os.SCHED_FIFO if eng.realtime else os.SCHED_OTHER)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the calling thread keeps its own
    assert ("worker at real-time priority" in eng.summary()) == eng.realtime


def test_a_session_the_real_time_worker_asks_for_is_made_at_normal_priority(monkeypatch, tmp_path):
    """A fixed-shape ONNX session is made on a thread of its own, which would inherit the worker's
    real-time scheduling (a live hop of 35-40 ms asks for it after the warm-up)."""
    from rtsr.backends import apply_backend
    from rtsr.live import realtime_priority
    from rtsr.onnx_backend import STATIC_AFTER

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = SuperResModel.random(seed=5, steps=0)
    apply_backend(model, "onnx")
    made_at = []
    monkeypatch.setattr(model.run, "_session", lambda dims: made_at.append(os.sched_getscheduler(0)))
    realtime = []

    def worker():
        realtime.append(realtime_priority())
        for _ in range(STATIC_AFTER):
            model.run.session_for(1, 4)
        for thread in list(model.run.making.values()):
            thread.join()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    if not realtime[0]:
        pytest.skip("real-time scheduling not permitted here")
    assert made_at == [os.SCHED_OTHER]


def test_worker_thread_recovers_from_an_injected_stall(model):
    """The real worker thread, a fake device paced at 10 ms, one 150 ms hang in the processor."""
    class Stalling(Passthrough):
        calls = 0

        def feed(self, block):
            Stalling.calls += 1
            if Stalling.calls == 15:
                time.sleep(0.15)
            return super().feed(block)

    eng = LiveEngine(Stalling(SR_IN, 1, 100), SR_IN, 1, HOP_IN, TARGET)
    x = signal(0.8)
    played = []
    eng.start()
    try:
        t0 = time.monotonic()
        for k in range(len(x) // TICK_IN):
            eng.input_callback(x[k * TICK_IN:(k + 1) * TICK_IN], TICK_IN, None, None)
            out = np.full((TICK_OUT, 1), np.nan, np.float32)
            eng.output_callback(out, TICK_OUT, None, None)
            played.append(out)
            time.sleep(max(t0 + (k + 1) * 0.01 - time.monotonic(), 0))
    finally:
        eng.stop()
    assert eng.error is None and not eng._thread.is_alive()
    assert not np.isnan(np.concatenate(played)).any()
    assert eng.c.underruns >= 1  # the hang was heard as silence and counted
    assert eng.out.readable <= TARGET + TICK_OUT + HOP_IN * 3  # and the latency came back


# --- what `rtsr bench latency` compares live with ------------------------------------------------


def test_bench_paces_blocks_as_a_device_delivers_them(monkeypatch):
    """Live feeds a block every hop and the caches go cold between them; bench timed only back to
    back, so its RTF was 1.5-2x under live's on the same settings."""
    clock = [0.0]
    monkeypatch.setattr(bench, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(bench, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    fed = []

    class Stream5ms:
        def feed(self, block):
            fed.append(clock[0])
            clock[0] += 0.030 if len(fed) == 3 else 0.005  # the third block overruns its 20 ms

    times = bench.time_rounds([Stream5ms()], np.zeros((100, 1)), 10, pace_s=0.02)
    assert fed == pytest.approx([0.0, 0.02, 0.04, 0.07, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18])  # late: at once
    assert times == pytest.approx([0.005, 0.005, 0.03] + [0.005] * 7)
    fed.clear()
    bench.time_rounds([Stream5ms()], np.zeros((30, 1)), 10)
    assert np.diff(fed) == pytest.approx([0.005, 0.005])  # back to back: no waiting


def test_bench_latency_reports_the_paced_figure(capsys, tiny_model_dir):
    argv = ["bench", "latency", "--model", str(tiny_model_dir), "--seconds", "0.3"]
    assert main([*argv, "--json"]) == 0
    paced = json.loads(capsys.readouterr().out)["paced"]
    assert paced["streams"] == 1 and paced["blocks"] == 15 and paced["rtf"] > 0
    assert main(argv) == 0
    assert "1 stream fed in real time, a block every 20 ms" in capsys.readouterr().out


# --- passthrough: the A/B reference ---------------------------------------------------------------


def test_passthrough_is_the_resampled_input_at_the_engine_latency(model):
    x = signal(0.5)
    s = Stream(model, SR_IN, 1, 20.0)
    p = Passthrough(SR_IN, 1, s.latency_samples)
    y = np.concatenate([p.feed(x[i:i + HOP_IN]) for i in range(0, len(x), HOP_IN)])
    assert len(y) == len(x) * 3 - s.latency_samples  # handed out exactly `latency` after its input
    np.testing.assert_allclose(y, resample(x, SR_IN)[:len(y)], atol=1e-6)
    whole = np.concatenate([y, p.flush()])  # the end: what it held back
    np.testing.assert_allclose(whole, resample(x, SR_IN), atol=1e-6)


def test_passthrough_is_heard_as_late_as_the_engine(model):
    """A click played through each: it comes out at the same time, to within a hop."""
    x = np.zeros((SR_IN // 2, 1), np.float32)
    x[SR_IN // 5] = 0.9
    when = []
    for proc in (Stream(model, SR_IN, 1, 20.0), Passthrough(SR_IN, 1, Stream(model, SR_IN).latency_samples)):
        played = drive(LiveEngine(proc, SR_IN, 1, HOP_IN, TARGET), x)
        when.append(int(np.argmax(np.abs(played[:, 0]))))
    assert abs(when[0] - when[1]) <= TARGET + TICK_OUT, when


# --- command line without PortAudio --------------------------------------------------------------


class _NoPortAudio(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return None


def test_missing_portaudio_is_one_line(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
    assert main(["live", "--list-devices"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install libportaudio2" in err


def test_ctrl_c_and_sigterm_ask_the_run_to_stop_instead_of_raising_wherever_it_is():
    """A KeyboardInterrupt thrown into a model load or a PortAudio call could crash the process
    (a segfault in 5 of 25 early Ctrl-Cs), and SIGTERM's default left only a hidden temporary."""
    before = signals.getsignal(signals.SIGINT), signals.getsignal(signals.SIGTERM)
    with stop_signals() as stop:
        os.kill(os.getpid(), signals.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: the user insists
            os.kill(os.getpid(), signals.SIGINT)
            time.sleep(0.05)
    assert (signals.getsignal(signals.SIGINT), signals.getsignal(signals.SIGTERM)) == before


@pytest.mark.skipif(sys.platform != "linux", reason="libc read through ctypes, pthread_kill")
def test_a_stop_signal_does_not_break_a_c_librarys_blocking_call():
    """JACK's client library does not retry a read a signal interrupted: a Ctrl-C while PortAudio
    started said "no audio devices found" or raised PortAudioError. The handlers restart such calls."""
    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    main_thread = threading.get_ident()

    def ctrl_c_then_data():
        time.sleep(0.2)
        signals.pthread_kill(main_thread, signals.SIGINT)
        time.sleep(0.2)
        os.write(w, b"x")

    other = threading.Thread(target=ctrl_c_then_data)
    try:
        with stop_signals() as stop:
            other.start()
            got = libc.read(r, ctypes.create_string_buffer(1), 1)  # blocks in C, as libjack does
            time.sleep(0.05)  # the Python handler runs between bytecodes
            assert got == 1 and stop.is_set()
    finally:
        other.join()
        os.close(r)
        os.close(w)


def _as_the_command(script: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter whose argv[0] is `rtsr`, as the console script's is."""
    return subprocess.run([sys.executable, "-c", f"import sys\nsys.argv = ['rtsr']\n{script}"],
                          capture_output=True, text=True, timeout=60)


def test_a_ctrl_c_while_the_command_loads_exits_quietly():
    """Before main() runs (the console script importing rtsr.cli) a Ctrl-C gave a traceback."""
    r = _as_the_command(
        "import importlib.abc, os, signal\n"
        "class CtrlC(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'argparse':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        "from rtsr.cli import main\n"
        "print('loaded')\n")
    assert (r.returncode, r.stdout, r.stderr) == (130, "", "")


def test_a_ctrl_c_after_the_command_exits_quietly_at_once():
    """In the interpreter's teardown (0.5-1 s with torch and PortAudio loaded) a Ctrl-C printed a
    traceback, or aborted PortAudio's JACK client (its Pa_Terminate, an atexit handler)."""
    r = _as_the_command(
        "import atexit, os, signal, time\n"
        "def late_ctrl_c():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.5)\n"
        "    print('the teardown went on')\n"
        "from rtsr.cli import main\n"
        "atexit.register(late_ctrl_c)\n"
        "sys.argv += ['--version']\n"
        "sys.exit(main())\n")
    assert (r.returncode, r.stderr) == (130, "") and r.stdout.startswith("rtsr ")  # what was printed is kept
    assert "went on" not in r.stdout


def test_a_ctrl_c_in_the_commands_cleanup_lets_it_finish_then_exits_quietly():
    """The command's atexit handlers (a stdin copy removed, PortAudio closed) are not cut short."""
    r = _as_the_command(
        "import atexit, os, signal, time\n"
        "import rtsr.cli\n"
        "def cleanup():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    print('cleaned up')\n"
        "run = rtsr.cli._run\n"
        "rtsr.cli._run = lambda argv: (atexit.register(cleanup), run(argv))[1]  # as a command registers one\n"
        "sys.argv += ['--version']\n"
        "sys.exit(rtsr.cli.main())\n")
    assert (r.returncode, r.stderr) == (130, "") and r.stdout.endswith("cleaned up\n")


def test_no_audio_devices_is_said_plainly(monkeypatch, capsys):
    """No sound server: PortAudio lists nothing; --list-devices printed an empty line and exited 0,
    a run said "no such input device None: Error querying device -1"."""
    import types

    fake = types.SimpleNamespace(query_devices=lambda *a, **k: [], query_hostapis=lambda: [{"name": "ALSA"}])
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    for argv in (["live", "--list-devices"], ["live", "--no-play", "--record", "x.wav"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no audio devices found (PortAudio looked through ALSA)" in err and "None" not in err


def test_live_is_registered():
    assert main(["live", "--help"]) == 0  # parsing needs no PortAudio: sounddevice is imported on use


# --- a real device: JACK's dummy backend ------------------------------------------------------------


@pytest.fixture
def jack_env(tmp_path):
    """A private jackd (dummy backend, 48 kHz, 10 ms periods) and the environment that reaches it."""
    if not shutil.which("jackd") or not shutil.which("jack_wait"):
        pytest.skip("jackd not installed (apt-get install jackd2 libportaudio2)")
    name = f"rtsr-test-{os.getpid()}"
    env = {**os.environ, "JACK_DEFAULT_SERVER": name, "JACK_NO_AUDIO_RESERVATION": "1"}
    log = (tmp_path / "jackd.log").open("w")
    proc = subprocess.Popen(["jackd", "--no-realtime", "-n", name, "-d", "dummy", "-r", "48000", "-p", "480"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        if subprocess.run(["jack_wait", "-w", "-t", "10"], env=env, capture_output=True, timeout=20).returncode:
            pytest.skip(f"jackd did not start: {(tmp_path / 'jackd.log').read_text()[-300:]}")
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_live_on_jack_dummy_device(jack_env, tiny_model_dir, tmp_path):
    """The whole command on a real PortAudio device: opens, runs, records, reports, exits 0."""
    out = tmp_path / "live.wav"
    cmd = [sys.executable, "-m", "rtsr.cli", "live", "--model", str(tiny_model_dir), "--duration", "1.5",
           "--record", str(out)]
    r = subprocess.run(cmd, env=jack_env, capture_output=True, text=True, timeout=90)
    if "PortAudio library not found" in r.stderr:
        pytest.skip("libportaudio2 not installed")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "xruns" in r.stderr and "recorded" in r.stderr
    info = sf.info(out)
    assert info.samplerate == 48000 and 1.0 <= info.duration <= 3.0


def test_a_device_that_cannot_run_at_the_asked_rate_opens_at_its_own():
    """A JACK server at 48 kHz and --input-sr 16000: opened at 48 kHz, band 8 kHz (or --cutoff)."""
    only_48k = lambda sr: sr == 48000  # noqa: E731
    assert choose_rate(only_48k, 48000, None, None) == (48000, None, None)
    assert choose_rate(only_48k, 48000, 48000, 5000.0) == (48000, 5000.0, None)
    sr, cutoff, note = choose_rate(only_48k, 48000, 16000, None)
    assert (sr, cutoff) == (48000, 8000.0) and "cannot run at 16000 Hz" in note
    assert choose_rate(only_48k, 48000, 16000, 3400.0)[:2] == (48000, 3400.0)
    assert choose_rate(lambda sr: True, 48000, 16000, None) == (16000, None, None)


def test_live_at_an_unsupported_rate_on_jack(jack_env, tiny_model_dir, tmp_path):
    out = tmp_path / "live.wav"
    cmd = [sys.executable, "-m", "rtsr.cli", "live", "--model", str(tiny_model_dir), "--duration", "1.0",
           "--input-sr", "16000", "--record", str(out), "--no-play"]
    r = subprocess.run(cmd, env=jack_env, capture_output=True, text=True, timeout=90)
    if "PortAudio library not found" in r.stderr:
        pytest.skip("libportaudio2 not installed")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cannot run at 16000 Hz" in r.stderr and "band 8.00 kHz (given)" in r.stderr
    assert "engine latency 0.0 ms" not in r.stderr


def _live(jack_env, tiny_model_dir, tmp_path, *args: str) -> tuple[subprocess.Popen, object]:
    err = (tmp_path / "stderr.txt").open("w")
    cmd = [sys.executable, "-m", "rtsr.cli", "live", "--model", str(tiny_model_dir), "--no-play", *args]
    return subprocess.Popen(cmd, env=jack_env, stdout=subprocess.DEVNULL, stderr=err), err


def test_sigterm_keeps_the_recording(jack_env, tiny_model_dir, tmp_path):
    """`timeout 8 rtsr live --record x.wav` (SIGTERM) used to leave only a hidden .x.wav.*.tmp."""
    out = tmp_path / "term.wav"
    proc, err = _live(jack_env, tiny_model_dir, tmp_path, "--record", str(out))
    deadline = time.monotonic() + 60
    while "Ctrl-C stops" not in (tmp_path / "stderr.txt").read_text() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signals.SIGTERM)
    assert proc.wait(30) == 0
    err.close()
    text = (tmp_path / "stderr.txt").read_text()
    if "PortAudio library not found" in text:
        pytest.skip("libportaudio2 not installed")
    assert "recorded" in text and "Traceback" not in text
    assert sf.info(out).duration > 0.5
    assert not list(tmp_path.glob(".term.wav*"))  # no temporary left


def test_a_ctrl_c_during_set_up_stops_cleanly(jack_env, tiny_model_dir, tmp_path):
    """Between opening the device and the first hop (torch's import, the model load, its warm-up):
    one plain line, no traceback, no crash, whether it lands there or in the run just begun."""
    proc, err = _live(jack_env, tiny_model_dir, tmp_path, "--input-sr", "16000", "--record", str(tmp_path / "e.wav"))
    deadline = time.monotonic() + 60
    while "cannot run at 16000 Hz" not in (tmp_path / "stderr.txt").read_text() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signals.SIGINT)
    rc = proc.wait(30)
    err.close()
    text = (tmp_path / "stderr.txt").read_text()
    assert (rc, "Traceback" in text) in ((130, False), (0, False)), text[-2000:]
    assert "stopped before the run began" in text or "recorded" in text
