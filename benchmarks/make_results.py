"""Add a dated block on top of benchmarks/RESULTS.md (and redraw docs/spectrogram.png) by running
the bench commands.

Every number in a block is the printed output of the command shown above it, run here, so a
number is never typed in and each one can be reproduced with its own command line. Earlier
blocks stay below, newest first, so today's numbers are at the top and yesterday's still there.

    python benchmarks/make_results.py [--eval ../shared/eval-dev] [--model basic]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from rtsr.bench import cpu_model

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT.parent / "shared" / "eval-dev"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TITLE = "# Benchmark results"
INTRO = ("Dated blocks, newest first. A block headed `make_results.py` is the whole output of one run of "
         "`python benchmarks/make_results.py`; a block headed `Added` was run by hand, each command shown above "
         "its numbers.")
CLIP = "speech_tux-dev_0"  # the README's example: dev-eval speech at 8 kHz
SCRATCH = "/tmp/rtsr_results"  # the upscaled clip behind the spectrogram
LIVE = ("--streams", "8", "--repeat", "5")  # live benches: up to 8 streams, median of 5 runs each


def sh(*argv: str) -> str:
    """Run a command from the repo root; its stdout, or the whole failure."""
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout.strip()


def training_running() -> bool:
    """Whether a training job shares the cores (pgrep without a shell, so it cannot match itself)."""
    return subprocess.run(["pgrep", "-f", "rtsr.training.train"], capture_output=True).returncode == 0


def section(title: str, command: list[str]) -> str:
    print(f"running: {' '.join(command)}", file=sys.stderr)
    return f"## {title}\n\n`{' '.join(command)}`\n\n{sh(*command)}\n"


def spectrogram(ev: str, model: str) -> str:
    """docs/spectrogram.png from a dev-eval speech clip at 8 kHz, upscaled, against its reference."""
    lr, hr, out = f"{ev}/lr/{CLIP}_8000.wav", f"{ev}/hr/{CLIP}.flac", f"{SCRATCH}/{CLIP}_8000_48k.wav"
    up = ["rtsr", "upscale", "-i", lr, "--output", out, "--overwrite", "--model", model, "-q"]
    cmp = ["rtsr", "compare", lr, out, "--ref", hr, "--plot", "docs/spectrogram.png"]
    sh(*up)
    return f"## Spectrogram (docs/spectrogram.png)\n\n`{' '.join(up)}`  \n`{' '.join(cmp)}`\n\n{sh(*cmp)}\n"


def earlier_blocks() -> str:
    """What RESULTS.md holds below its title and intro (a file from before dated blocks: all but its title)."""
    if not RESULTS.exists():
        return ""
    text = RESULTS.read_text()
    text = text.removeprefix(TITLE).lstrip("\n").removeprefix(INTRO).lstrip("\n")
    return text if text.startswith("# ") else f"# Earlier (one run and hand-run additions)\n\n{text}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", type=Path, default=EVAL)
    p.add_argument("--model", default="basic", help="the model timed and pictured")
    p.add_argument("--quality-models", default="basic,speech", help="models scored on the eval set")
    a = p.parse_args()
    ev = os.path.relpath(a.eval.resolve(), ROOT)  # as typed from the repo root
    outputs = ("benchmarks/RESULTS.md", "docs/spectrogram.png")  # what this script rewrites
    dirty = [line for line in sh("git", "status", "--porcelain", "--untracked-files=no").splitlines()
             if line[3:] not in outputs]
    training = training_running()
    m = ["--model", a.model]
    parts = [
        section("Latency, 16 kHz input, 20 ms hop",
                ["rtsr", "bench", "latency", "--input-sr", "16000", "--hop-ms", "20", *LIVE, *m]),
        section("Latency, 16 kHz input, 10 ms hop",
                ["rtsr", "bench", "latency", "--input-sr", "16000", "--hop-ms", "10", *LIVE, *m]),
        section("Latency, 16 kHz input, 5 ms hop (the project's 20 ms latency goal)",
                ["rtsr", "bench", "latency", "--input-sr", "16000", "--hop-ms", "5", *LIVE, *m]),
        section("Throughput (offline upscale), 16 kHz input",
                ["rtsr", "bench", "throughput", "--input-sr", "16000", "--seconds", "30", *m]),
        section("Eager vs ONNX Runtime, hop by hop in one process, 16 kHz input, 20 ms hops",
                ["python", "benchmarks/backend_bench.py", "--seconds", "30", "--hop-ms", "20", *m]),
        section("ZeroMQ service round trip, 16 kHz input, 20 ms blocks paced in real time",
                ["python", "benchmarks/serve_bench.py", "--seconds", "10", "--streams", "1,2,4,8,16", *m]),
        section("Soak: nothing lost through serve and a broker with a worker killed",
                ["python", "benchmarks/soak_bench.py", "--streams", "16", "--seconds", "20", *m]),
        *[section(f"Quality on the dev-eval set: `{q}`", ["rtsr", "bench", "quality", "--eval", ev, "--model", q])
          for q in a.quality_models.split(",")],
        section("Band-edge detector on generated material", ["rtsr", "bench", "band"]),
        section("Band-edge detector on the dev-eval references", ["rtsr", "bench", "band", "--eval", ev]),
        section(f"What limits quality: `{a.model}` next to oracles",
                ["python", "benchmarks/quality_limits.py", "--eval", ev, *m]),
        spectrogram(ev, a.model),
    ]
    training = training or training_running()  # at the start or at the end
    head = [
        f"# make_results.py, {time.strftime('%Y-%m-%d %H:%M %Z')}, commit "
        f"`{sh('git', 'rev-parse', '--short', 'HEAD')}`{' plus uncommitted changes' if dirty else ''}",
        "",
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; every command runs torch with 1 thread "
        f"(`--threads 1`, the default). Model: `{a.model}` with its shipped sampler steps.",
        "",
        "**A training job (`rtsr.training.train`) was running on the same cores during these measurements**, so "
        "every time below is slower and noisier than on an idle machine." if training else
        "No training job was running during these measurements.",
        "",
    ]
    block = "\n".join(head) + "\n" + "\n".join(parts)
    RESULTS.write_text(f"{TITLE}\n\n{INTRO}\n\n{block}\n{earlier_blocks()}")
    print("wrote benchmarks/RESULTS.md and docs/spectrogram.png", file=sys.stderr)


if __name__ == "__main__":
    main()
