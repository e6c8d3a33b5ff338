"""`rtsr upscale --scheduler`: files on a Dask cluster, outputs equal to a local run, a lost worker's
files re-run elsewhere. Real worker processes (a LocalCluster, and Dask's own CLI)."""

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rtsr.cli import main

pytest.importorskip("distributed")
TIMEOUT = 120.0


def _inputs(folder: Path, n: int, seconds: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        sr = (8000, 16000, 22050)[i % 3]
        x = 0.1 * np.random.default_rng(i).standard_normal((round(sr * seconds), 1 + i % 2))
        if i == n - 1:  # a lossy file: its holes are filled on a worker as locally
            paths.append(folder / f"clip{i:02d}.mp3")
            sf.write(paths[-1], x.astype(np.float32), sr, format="MP3", subtype="MPEG_LAYER_III")
        else:
            paths.append(folder / f"clip{i:02d}.wav")
            sf.write(paths[-1], x.astype(np.float32), sr, subtype="FLOAT")
    return paths


def _run(capsys, model: Path, *args: object) -> tuple[int, dict]:
    rc = main(["upscale", *map(str, args), "--model", str(model), "--device", "cpu", "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def _same_outputs(a: Path, b: Path) -> int:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        x, sr_x = sf.read(a / name, dtype="float32")
        y, sr_y = sf.read(b / name, dtype="float32")
        assert sr_x == sr_y == 48000 and x.shape == y.shape
        assert np.abs(x - y).max() <= 1e-6
    return len(names)


def test_local_cluster_equals_a_local_run_and_resumes(capsys, tmp_path, tiny_model_dir):
    _inputs(tmp_path / "in", 5, 0.5)
    (tmp_path / "in" / "broken.wav").write_bytes(b"RIFF not audio")
    rc, local = _run(capsys, tiny_model_dir, "-i", tmp_path / "in", "-o", tmp_path / "local")
    rc2, dist = _run(capsys, tiny_model_dir, "-i", tmp_path / "in", "-o", tmp_path / "dask", "--scheduler", "local:2")
    assert rc == rc2 == 1  # the broken file fails in both, the batch goes on
    assert dist["totals"]["upscaled"] == local["totals"]["upscaled"] == 5 and dist["totals"]["failed"] == 1
    assert [r["status"] for r in dist["results"]] == [r["status"] for r in local["results"]]
    assert [r["cutoff_hz"] for r in dist["results"]] == [r["cutoff_hz"] for r in local["results"]]
    filled = [r["holes_filled"] for r in dist["results"]]
    assert filled == [r["holes_filled"] for r in local["results"]] and filled.count(True) == 1
    broken = next(r for r in dist["results"] if r["input"].endswith("broken.wav"))
    assert "not a readable audio file" in broken["error"]
    assert _same_outputs(tmp_path / "local", tmp_path / "dask") == 5
    (tmp_path / "dask" / "clip01_48k.wav").unlink()
    rc, again = _run(capsys, tiny_model_dir, "-i", tmp_path / "in", "-o", tmp_path / "dask", "--scheduler", "local:1")
    assert again["totals"]["skipped"] == 4 and again["totals"]["upscaled"] == 1
    assert _same_outputs(tmp_path / "local", tmp_path / "dask") == 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("dask") is None, reason="Dask's CLI is not installed")
def test_a_worker_killed_mid_batch_loses_no_file(capsys, tmp_path, tiny_model_dir):
    """`dask scheduler` + two `dask worker` processes; one is killed after the first outputs appear:
    every output still comes, equal to a local run's."""
    paths = _inputs(tmp_path / "in", 16, 2.0)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(2)
        for _ in range(2):
            procs.append(subprocess.Popen(["dask", "worker", address, "--nthreads", "1", "--nworkers", "1",
                                           "--no-nanny", "--dashboard-address", ":0"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = tmp_path / "dask"
        result: dict = {}
        th = threading.Thread(target=lambda: result.update(rc=main(
            ["upscale", "-i", str(tmp_path / "in"), "-o", str(out), "--model", str(tiny_model_dir),
             "--device", "cpu", "--scheduler", address, "-q"])))
        th.start()
        deadline = time.monotonic() + TIMEOUT
        while not (out.exists() and len(list(out.glob("*.wav"))) >= 2):
            assert time.monotonic() < deadline and th.is_alive(), "no output came"
            time.sleep(0.05)
        done_at_kill = len(list(out.glob("*.wav")))
        procs[1].send_signal(signal.SIGKILL)
        th.join(TIMEOUT)
        assert not th.is_alive() and result["rc"] == 0
        assert done_at_kill < len(paths)  # the kill did come mid-batch
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    capsys.readouterr()
    rc, _ = _run(capsys, tiny_model_dir, "-i", tmp_path / "in", "-o", tmp_path / "local")
    assert rc == 0 and _same_outputs(tmp_path / "local", out) == len(paths)


def test_a_scheduler_that_is_not_there_is_a_clear_error(capsys, tmp_path, tiny_model_dir):
    _inputs(tmp_path / "in", 1, 0.2)
    rc = main(["upscale", "-i", str(tmp_path / "in"), "--model", str(tiny_model_dir), "--scheduler",
               f"tcp://127.0.0.1:{_free_port()}"])
    assert rc == 2 and "cannot use the Dask scheduler" in capsys.readouterr().err
