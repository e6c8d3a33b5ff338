"""`rtsr upscale`'s batch: which files, written where, then each one upscaled and reported.

Its arguments are `rtsr.cli`'s (which loads this module, and with it the engine, only to run).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from rtsr.audio_io import FORMATS, STDIO
from rtsr.av_decode import duration_s
from rtsr.cli import AUDIO_EXTS, OUT_SUFFIX, CliError
from rtsr.file_batch import upscale_files
from rtsr.files import BandChoice, Job, LoadOptions, Result, load_upscaler
from rtsr.model import ModelError
from rtsr.upscaler import Upscaler

# --- planning: which files, written where ------------------------------------------------------


def _read_list(path: Path) -> list[Path]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read input list {path}: {e}") from e
    entries = (line.strip() for line in lines)
    return [path.parent / e for e in entries if e and not e.startswith("#")]


def _scan(folder: Path, pattern: str | None, outdir: Path | None) -> tuple[list[Path], list[Path]]:
    """Files under a folder, recursively, minus hidden files, as (inputs, earlier outputs left out).

    An earlier output is a file inside -o OUTDIR, or NAME_48k.* beside an input NAME.*: a run
    writing next to its inputs must not take its own results as inputs the next time. Any other
    name ending in _48k is an input like the rest.
    """
    if pattern:
        found = folder.rglob(pattern)
    else:
        found = (f for f in folder.rglob("*") if f.suffix.lower().lstrip(".") in AUDIO_EXTS)
    files = sorted(f for f in found if f.is_file() and not f.name.startswith("."))
    out_root = outdir.resolve() if outdir is not None else None
    stems = {(f.parent, f.stem) for f in files}
    ours = [f for f in files if (out_root is not None and out_root in f.resolve().parents)
            or (f.stem.endswith(OUT_SUFFIX) and (f.parent, f.stem[:-len(OUT_SUFFIX)]) in stems)]
    return [f for f in files if f not in ours], ours


def _named(args: argparse.Namespace) -> list[Path]:
    """The inputs named on the command line, bare or after -i, in that order."""
    return [*args.paths, *args.inputs]


def _sources(args: argparse.Namespace) -> list[tuple[Path, Path | None]]:
    """Every input as (file, the folder it was found under or None); an empty folder is kept as
    (folder, folder) so it gets its own failure line."""
    paths = _named(args)
    for lst in args.lists:
        paths += _read_list(lst)
    if not paths:
        raise CliError("no inputs: give FILE_OR_DIR (or -i FILE_OR_DIR) or -il LIST")
    out: list[tuple[Path, Path | None]] = []
    for path in paths:
        if path.is_dir():
            found, ours = _scan(path, args.glob, args.outdir)
            if ours:
                print(f"note: {len(ours)} earlier output(s) under {path} not taken as inputs "
                      f"(e.g. {ours[0]})", file=sys.stderr)
            out += [(f, path) for f in found] or [(path, path)]
        else:
            out.append((path, None))
    return out


def _dest(src: Path, root: Path | None, args: argparse.Namespace, fmt: str, tag: bool = False) -> Path:
    """Where an input's output goes; `tag` puts the input's extension in the name (song.mp3 ->
    song_mp3_48k.wav), for inputs that would otherwise share one output."""
    if args.output is not None:
        return args.output
    if src == STDIO:
        raise CliError("-i - (standard input) needs --output FILE, or --output - for standard output")
    stem = f"{src.stem}_{src.suffix.lstrip('.').lower()}" if tag and src.suffix else src.stem
    name = f"{stem}{OUT_SUFFIX}.{fmt}"
    if args.outdir is None:
        return src.with_name(name)
    return args.outdir / (src.parent.relative_to(root) if root else Path()) / name


def plan(args: argparse.Namespace, fmt: str) -> list[Job]:
    """Inputs in order, each file once, each with an output of its own: inputs that would share one
    (song.mp3 and song.ogg) get their extension in the name; inputs that still share one are a
    command-line error, before any work. An output that exists already is skipped (a batch
    resumes where it stopped) unless --overwrite."""
    jobs, seen = [], set()
    for src, root in _sources(args):
        if src == root:
            pattern = args.glob or "audio files"
            jobs.append(Job(src, error=f"folder has no {pattern} (searched recursively)"))
        elif src.resolve() not in seen:
            seen.add(src.resolve())
            jobs.append(Job(src, _dest(src, root, args, fmt), root=root))
    if args.output is not None and len(jobs) != 1:
        raise CliError(f"--output needs exactly one input file, got {len(jobs)}; use -o OUTDIR")
    if args.output is not None and args.output != STDIO and args.output.resolve() == jobs[0].src.resolve():
        raise CliError(f"--output {args.output} is the input itself; write the upscale to another file")
    by_dest: dict[Path, list[Job]] = {}
    for job in jobs:
        if job.dest is not None:
            by_dest.setdefault(job.dest.resolve(), []).append(job)
    for shared in (js for js in by_dest.values() if len(js) > 1):
        for job in shared:
            job.dest = _dest(job.src, job.root, args, fmt, tag=True)
    final: dict[Path, Job] = {}
    for job in (j for j in jobs if j.dest is not None):
        if (other := final.setdefault(job.dest.resolve(), job)) is not job:
            raise CliError(f"{other.src} and {job.src} would both be written to {job.dest}; "
                           "rename one, or upscale them into different -o folders")
        job.skip = job.dest != STDIO and job.dest.exists() and not args.overwrite
    return jobs


def _format(args: argparse.Namespace) -> str:
    """--format, else --output's suffix, else wav; a contradiction between them is refused."""
    if args.output is None or args.output == STDIO:
        return args.format or "wav"
    suffix = args.output.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise CliError(f"--output {args.output} must end in {' or '.join('.' + f for f in FORMATS)}")
    if args.format and args.format != suffix:
        raise CliError(f"--output {args.output} does not match --format {args.format}")
    return suffix


# --- running ----------------------------------------------------------------------------------


def _totals(results: list[Result]) -> dict[str, float | int]:
    count = {s: sum(r.status == s for r in results) for s in ("upscaled", "resampled", "skipped", "failed")}
    done = [r for r in results if r.status in ("upscaled", "resampled")]
    return {"files": len(results), **count, "seconds": sum((r.seconds for r in done), 0.0),
            "compute_s": sum((r.compute_s for r in done), 0.0)}


def _summary(totals: dict[str, float | int]) -> str:
    parts = [f"{totals['upscaled']} upscaled"]
    for status in ("resampled", "skipped"):
        if totals[status]:
            parts.append(f"{totals[status]} {status}")
    return ", ".join(parts + [f"{totals['failed']} failed"])


def _load(args: argparse.Namespace) -> Upscaler:
    try:
        return load_upscaler(LoadOptions.of(args))
    except ModelError as e:
        raise CliError(str(e)) from e
    except RuntimeError as e:  # e.g. --device cuda without a GPU
        raise CliError(f"cannot load model {args.model!r} on {args.device}: {e}") from e


def run_upscale(args: argparse.Namespace) -> int:
    """The batch: plan every output first, load the model once (here, or once per Dask worker),
    then the files (here in batches, rtsr.file_batch)."""
    fmt = _format(args)
    if args.outdir is not None and args.outdir.exists() and not args.outdir.is_dir():
        raise CliError(f"-o {args.outdir} is a file, not a folder")
    if STDIO in _named(args) and sys.stdin.isatty():  # it would wait for the keyboard
        raise CliError("- reads audio from standard input, which is a terminal here: pipe a file in "
                       "(cat in.wav | rtsr upscale - ...)")
    if args.output == STDIO and sys.stdout.isatty():
        raise CliError("--output - writes WAV to standard output, which is a terminal here: redirect it "
                       "(> out.wav) or pipe it on")
    jobs = plan(args, fmt)
    chatty = not (args.quiet or args.json)
    reports = sys.stderr if args.output == STDIO else sys.stdout  # standard output may be the audio
    seconds = {str(j.src): _duration(j) for j in jobs}  # the bar moves by audio, inside long files too
    bar = tqdm(total=round(sum(seconds.values()), 1), unit="s", unit_scale=True, file=sys.stderr,
               disable=not chatty or not sys.stderr.isatty(), bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio "
                                                                        "[{elapsed}<{remaining}]")
    shown: dict[str, float] = {}

    def progress(src: str, s: float) -> None:
        shown[src] = shown.get(src, 0.0) + s
        bar.update(s)

    def report(res: Result) -> None:
        bar.update(max(seconds.get(res.input, 0.0) - shown.get(res.input, 0.0), 0.0))
        if res.status == "failed":
            tqdm.write(res.line(), file=sys.stderr)
        elif chatty:
            tqdm.write(res.line(), file=reports)

    with bar:
        if args.scheduler:
            results = _on_cluster(args, jobs, fmt, report)
            model, device = args.model, f"dask {args.scheduler}"
        else:
            up = _load(args)
            results = upscale_files(up, jobs, seconds, fmt, BandChoice.of(args), args.overwrite, progress, report)
            model, device = up.model.name, up.model.device
    totals = _totals(results)
    if args.json:
        report_ = {"model": model, "device": device, "format": fmt,
                   "results": [asdict(r) for r in results], "totals": totals}
        print(json.dumps(report_, indent=1), file=reports)
    elif chatty or totals["failed"]:
        print(_summary(totals), file=reports if chatty else sys.stderr)
    return 1 if totals["failed"] else 0


def _duration(job: Job) -> float:
    """Seconds of audio a planned job will upscale, from the file's header (0 if it will not run)."""
    if job.dest is None or job.skip or job.src == STDIO:  # libsndfile would read standard input
        return 0.0
    try:
        info = sf.info(str(job.src))
        return info.frames / info.samplerate
    except (sf.SoundFileError, RuntimeError, ZeroDivisionError):
        return duration_s(job.src)  # what FFmpeg decodes: its container's header
    except OSError:
        return 0.0


def _on_cluster(args: argparse.Namespace, jobs: list[Job], fmt: str, report: Callable[[Result], None]) -> list[Result]:
    try:
        from rtsr.cluster import run_on_cluster
    except ImportError as e:
        raise CliError(f"--scheduler needs Dask's distributed package: pip install 'rtsr[cluster]' ({e})") from e
    try:
        return run_on_cluster(args.scheduler, jobs, LoadOptions.of(args), fmt, BandChoice.of(args), args.overwrite,
                              report)
    except (OSError, TimeoutError, ValueError) as e:
        raise CliError(f"cannot use the Dask scheduler {args.scheduler}: {e}") from e
