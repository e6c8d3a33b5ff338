"""The `rtsr` command.

    rtsr upscale -i talk.wav                           # -> talk_48k.wav next to it
    rtsr upscale -i album/ --glob '*.flac' -o out/ --format flac

Subcommands are listed in `COMMANDS` with the module that defines them and their line in `rtsr
--help`; only the one being run is imported, so `rtsr --help`, a thin command (broker, filter,
keygen) or a command line error loads no engine and no torch. Each module has an
`add_parser(subparsers)` that adds its own parser and sets `func=<callable(args) -> exit status>`
with `set_defaults`; adding one is one line in `COMMANDS`. A command line error is reported by
printing it and returning 2 (or raising CliError).

Ctrl-C ends the command with status 130 and no traceback wherever it lands once Python runs this
module: while the command loads (below), while it runs (`main`, or the command's own handling, as
in `rtsr live`), and in the interpreter's teardown after it (0.5-1 s with torch and PortAudio
loaded, where it printed a traceback or aborted PortAudio's JACK client).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def _exit_quietly(signum: int, frame: Any) -> None:
    """Ctrl-C outside a command's run: what was printed is flushed, then the process ends (130)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(130)


_ctrl_c_seen = False


def _note_ctrl_c(signum: int, frame: Any) -> None:
    """Ctrl-C while the atexit handlers clean up (a stdin copy removed, PortAudio closed): they finish first."""
    global _ctrl_c_seen
    _ctrl_c_seen = True


def _after_cleanup() -> None:
    """main() registers this atexit handler before the command's own, so it runs after them: a
    Ctrl-C noted meanwhile ends the process now, and one in the rest of the teardown at once."""
    if _ctrl_c_seen:
        _exit_quietly(signal.SIGINT, None)
    _on_ctrl_c(_exit_quietly)


def _on_ctrl_c(handler: Callable[[int, Any], None]) -> None:
    signal.signal(signal.SIGINT, handler)
    signal.siginterrupt(signal.SIGINT, False)  # nor breaks a C library's call under way (PortAudio's close)


if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "rtsr":  # the command, not a program importing it
    _on_ctrl_c(_exit_quietly)  # until main() runs (the imports below, argparse's and a command's, take a while)

import argparse  # noqa: E402
from importlib import import_module  # noqa: E402
from pathlib import Path  # noqa: E402

from rtsr import __version__  # noqa: E402

COMMANDS = {  # name: (the module that defines it, its line in `rtsr --help`)
    "upscale": (__name__, "upscale audio files and folders to 48 kHz"),
    "serve": ("rtsr.serve", "serve the streaming engine over ZeroMQ"),
    "filter": ("rtsr.client", "stream a file through a running `rtsr serve` or `rtsr broker`"),
    "broker": ("rtsr.broker", "load-balance streams over several `rtsr serve --connect-broker` workers"),
    "keygen": ("rtsr.curve", "write CURVE keys for serve, broker, filter and clients (--curve-keys DIR)"),
    "bench": ("rtsr.bench", "latency, throughput and quality on this machine"),
    "compare": ("rtsr.compare", "before/after log spectrograms of an upscaled file"),
    "live": ("rtsr.live", "microphone (or any input device) -> engine -> speakers and/or a file"),
}
# rtsr.backends.BACKENDS, named here so that `upscale --help` needs no torch (a test keeps them equal)
BACKEND_NAMES = ("auto", "eager", "onnx", "onnx-int8", "compile", "cudagraph", "compile-cudagraph", "tensorrt")
# what a folder is searched for: what libsndfile reads, and the audio files FFmpeg decodes (a video's
# sound track is taken when the video is named, or with --glob)
AUDIO_EXTS = ("wav", "flac", "ogg", "opus", "mp3", "aiff", "aif", "au", "caf", "w64", "m4a", "m4b", "aac", "mka")
OUT_SUFFIX = "_48k"


class CliError(Exception):
    """A problem with the command line as a whole (not one file): printed plainly, exit status 2."""


# --- arguments ------------------------------------------------------------------------------


def device_name(text: str) -> str:
    """--device's type: auto, cpu, cuda or cuda:N (whether it is there is the model's load to say)."""
    from rtsr.upscaler import known_device  # torch: only for the commands that run a model

    if not known_device(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")
    return text


def positive_int(text: str, most: int | None = None) -> int:
    """An argparse type (up to `most`: bind it with functools.partial) whose refusal names the
    value, not this function."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if most is not None and not 1 <= n <= most:
        raise argparse.ArgumentTypeError(f"expected 1..{most}, got {text!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return n


def cutoff_hz(text: str) -> float | None:
    """rtsr.cutoff's --cutoff type, whose module (numba, scipy) is loaded only when it is given."""
    from rtsr.cutoff import cutoff_arg

    return cutoff_arg(text)


def _scheduler(text: str) -> str:
    """A Dask scheduler's address, or local:N with N at least 1 (local:0 would wait for ever)."""
    workers = text.removeprefix("local:")
    if workers != text and not (workers.isdigit() and int(workers) >= 1):
        raise argparse.ArgumentTypeError(f"local:N needs N, the worker processes to start, at least 1; got {text!r}")
    return text


def add_upscale_parser(subparsers: argparse._SubParsersAction) -> None:
    from rtsr.audio_io import FORMATS  # numpy with it: not for the other commands, nor before main() runs

    p = subparsers.add_parser(
        "upscale", help="upscale audio files and folders to 48 kHz",
        description="Upscale audio files to 48 kHz: same length in time, same channels, zero lag, "
                    "loudness untouched. Each file is scanned for where its real band ends, at any rate, and "
                    "extended above it; only a full band (no low-pass edge below ~20 kHz) at 48 kHz or more "
                    "is just resampled.",
        epilog="exit status: 0 all files done, 1 some files failed, 2 bad command line or model")
    p.add_argument("paths", nargs="*", type=Path, metavar="FILE_OR_DIR", help="inputs, as -i gives them")
    p.add_argument("-i", "--input", dest="inputs", action="append", default=[], type=Path,
                   metavar="FILE_OR_DIR",
                   help="a file (WAV, FLAC, MP3, Ogg, AAC/M4A, ALAC, the sound of an MP4/MOV/WebM/MKV video; "
                        "- reads standard input), or a folder searched recursively (repeatable)")
    p.add_argument("-il", "--input-list", dest="lists", action="append", default=[], type=Path,
                   metavar="LIST",
                   help="a text file of inputs, one per line; blank lines and # comments skipped, "
                        "relative paths taken from the list's folder (repeatable)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--outdir", type=Path, metavar="OUTDIR",
                     help=f"write <stem>{OUT_SUFFIX}.<fmt> here, mirroring input subfolders "
                          "(default: next to each input)")
    out.add_argument("--output", type=Path, metavar="FILE",
                     help="the output file, for exactly one input (- writes it to standard output, "
                          "reports go to standard error)")
    p.add_argument("--glob", metavar="PATTERN",
                   help=f"which files to take from folders (default: *.{{{','.join(AUDIO_EXTS)}}}); "
                        f"hidden files and earlier outputs are skipped: NAME{OUT_SUFFIX}.* beside an input NAME.*, "
                        "and files inside -o OUTDIR")
    p.add_argument("--format", choices=tuple(FORMATS),
                   help="wav: 32-bit float, never clips; flac: 24-bit, clips outside [-1, 1) "
                        "(default: from --output's suffix, else wav)")
    p.add_argument("--model", default="basic", help="bundled model name or model folder (default: basic)")
    p.add_argument("--steps", type=positive_int, metavar="N", help="sampler steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="noise seed; same seed, same output (default: 0)")
    p.add_argument("--cutoff", type=cutoff_hz, default=None, metavar="auto|HZ",
                   help="where the input's real band ends, 1000..24000 Hz and at most the input's Nyquist "
                        "(default: auto, each file scanned for its band before it is upscaled)")
    p.add_argument("--keep-holes", action="store_true",
                   help="keep a lossy input's (MP3, Vorbis, Opus) codec holes: the bands its encoder zeroed "
                        "below the band edge (default: filled from the model, every other cell kept as it is)")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto",
                   help="network execution backend (default auto: the fastest that works here)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="CPU threads for the model (default 1: its small matrices gain little from more, "
                        "and oversubscribed threads are many times slower)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="upscale each batch's signals as N segments side by side on N threads, one model thread "
                        "each (same output for any N; default: the machine's cores, up to 8; 1 with --scheduler)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: skip inputs whose output exists, so a "
                        "stopped batch resumes)")
    p.add_argument("--scheduler", type=_scheduler, metavar="ADDRESS",
                   help="run the files on a Dask cluster: a scheduler address (tcp://host:8786), or local:N "
                        "for N local worker processes; inputs are sent to the workers, outputs written here "
                        "(needs the cluster extra: pip install 'rtsr[cluster]')")
    p.add_argument("--json", action="store_true", help="print one JSON object with per-file results")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only failures")
    p.set_defaults(func=_run_upscale)


def _run_upscale(args: argparse.Namespace) -> int:
    from rtsr.upscale_batch import run_upscale  # the engine and torch: loaded only to run

    return run_upscale(args)


# --- entry point ------------------------------------------------------------------------------


def _add_parser(name: str) -> Callable[[argparse._SubParsersAction], None]:
    module = COMMANDS[name][0]
    return add_upscale_parser if module == __name__ else import_module(module).add_parser


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line with `command`'s own parser (its module imported); every other command is
    only listed, by name and line."""
    parser = argparse.ArgumentParser(prog="rtsr", description="Real-time audio super-resolution to 48 kHz.")
    parser.add_argument("--version", action="version", version=f"rtsr {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, line) in COMMANDS.items():
        if name == command:
            _add_parser(name)(subparsers)
        else:
            subparsers.add_parser(name, help=line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status instead of exiting, so tests can call it. Run as
    the command (no argv), a Ctrl-C after it (in the interpreter's teardown) ends it at once."""
    if argv is None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # commands see KeyboardInterrupt
        atexit.register(_after_cleanup)
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # also while a command's module is still being imported
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rtsr ... --json | head`: the reader left; say nothing more
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    finally:
        if argv is None:
            _on_ctrl_c(_note_ctrl_c)


def _run(argv: list[str]) -> int:
    parser = build_parser(next(iter(argv), None))
    try:
        args, extra = parser.parse_known_args(argv)
        unknown = [e for e in extra if e.startswith("-") and e != "-"] if hasattr(args, "paths") else extra
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if extra:  # inputs after an option too: rtsr upscale a.wav -o out/ b.wav
            args.paths += map(Path, extra)
    except SystemExit as e:  # --help, --version, or argparse's own usage error (status 2)
        return e.code if isinstance(e.code, int) else 2
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except CliError as e:
        print(f"rtsr {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m rtsr.cli: run as rtsr.cli itself, whose CliError the batch raises
    sys.exit(import_module("rtsr.cli").main())
