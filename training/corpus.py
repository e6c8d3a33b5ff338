"""Reproducible training-corpus builder: open recordings shipped by Debian packages -> 48 kHz mono FLAC.

No dataset hub is reachable, so rtsr trains on the packages listed in /work/shared/corpus/SOURCES.md.
Every file is decoded, mixed to mono, resampled to 48 kHz, trimmed of digital silence and kept if its
own band (`rtsr.bench_quality.band_edge_hz`, the in-band scorer's edge) reaches 4 kHz; every segment
records its band edge in the manifest (`band_hz`), where training stops its losses and below which
it places the simulated cutoffs: a narrow-band file still teaches every cutoff under its band.

    python -m rtsr.training.corpus build --out corpus [--install] [--kinds speech,music,sfx] [--jobs N]
    python -m rtsr.training.corpus stats --corpus corpus
    python -m rtsr.training.corpus pack --corpus corpus --out DIR --max-mib 55 --mix speech=.3,music=.4,sfx=.3
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import logging
import random
import re
import shutil
import subprocess
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from math import ceil, gcd
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly
from tqdm import tqdm

from rtsr.bench_quality import band_edge_hz

SR = 48_000
MIN_BAND_HZ = 4_000.0  # room for simulated cutoffs of 2-3.6 kHz under it
MAX_SEG_S, MIN_SEG_S = 10.0, 0.25
SPEECH_MIN_S, SPEECH_TARGET_S, SPEECH_GAP_S = 0.3, 8.0, 0.15
SILENCE = 1e-4  # |x| below -80 dBFS at the ends counts as digital silence (codecs leave tiny residue)
VAL_PERMILLE = 50
SF2 = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
AUDIO_EXT = {".ogg", ".opus", ".wav", ".flac", ".mid"}
ARCHIVE_EXT = {".pk3", ".zip", ".wz"}
EXCLUDED_LANGS = {"tuxpaint-stamps-default": {"el", "da"}}  # dev-eval (SOURCES.md): never train on them
BLOCKED = ("ktuberling", "naev", "lomiri", "opensfx")  # dev-eval packages: a path naming one is a bug
G = "/usr/share/games"
KINDS = ("speech", "music", "sfx")
RENDER_PACKAGES = ("fluidsynth", "fluid-soundfont-gm")  # music: MIDI renders
log = logging.getLogger("rtsr.corpus")


@dataclass(frozen=True)
class Source:
    """One row of the corpus table: files matching `pattern` under `root`, or zip `members` of them."""

    kind: str
    package: str
    root: str
    pattern: str
    members: str = ""
    exclude: str = ""


SOURCES = (
    Source("speech", "tuxpaint-stamps-default", "/usr/share/tuxpaint/stamps", "**/*_desc_*"),
    Source("speech", "klettres-data", "/usr/share/klettres", "**/*.ogg"),
    Source("speech", "nexuiz-data", f"{G}/nexuiz/data", "data.pk3", members="sound/tutorial/*.ogg"),
    Source("speech", "nexuiz-data", f"{G}/nexuiz/data", "data.pk3", members="sound/player/*.ogg"),
    Source("speech", "gcin-voice", "/usr/share/gcin-voice", "ogg/*/*.ogg"),
    Source("speech", "kajongg", "/usr/share/kajongg/voices", "**/*.ogg"),
    Source("speech", "fillets-ng-data-cs", f"{G}/fillets-ng/sound", "**/cs/*.ogg"),
    Source("speech", "festvox-ru", "/usr/share/festival/voices/russian", "*/wav/*.wav"),
    Source("music", "warzone2100-music", f"{G}/warzone2100/music", "**/*.opus"),
    Source("music", "ufoai-music", f"{G}/ufoai/base", "0music.pk3", members="*.ogg"),
    Source("music", "drascula-music", "/usr/share/scummvm/drascula/audio", "*.ogg"),
    Source("music", "wesnoth-1.16-music", f"{G}/wesnoth/1.16/data/core/music", "*.ogg"),
    Source("music", "widelands-data", f"{G}/widelands/data/music", "*.ogg"),
    Source("music", "colobot-common-sounds", f"{G}/colobot/music", "*.ogg"),
    Source("music", "freedroidrpg-data", "/usr/share/freedroidrpg/data/sound/music", "*.ogg"),
    Source("music", "megaglest-data", f"{G}/megaglest", "**/music/*.ogg"),
    Source("music", "openttd-openmsx", f"{G}/openttd/baseset/openmsx", "*.mid"),
    Source("music", "supertux-data", f"{G}/supertux2/music", "**/*.ogg"),
    Source("music", "fretsonfire-songs-muldjord", f"{G}/fretsonfire/data/songs/muldjord", "*/*.ogg"),
    Source("music", "fretsonfire-songs-sectoid", f"{G}/fretsonfire/data/songs/sectoid", "*/*.ogg"),
    Source("music", "marsshooter-data", f"{G}/marsshooter/audio/music", "*.ogg"),
    Source("sfx", "megaglest-data", f"{G}/megaglest", "**/*.*", exclude=r"/music/"),
    Source("sfx", "wesnoth-1.16-data", f"{G}/wesnoth/1.16/data", "**/sounds/**/*.*"),
    Source("sfx", "ufoai-sound", f"{G}/ufoai/base", "0snd.pk3", members="*.ogg"),
    Source("sfx", "lmms-common", "/usr/share/lmms/samples", "**/*.*"),
    Source("sfx", "colobot-common-sounds", f"{G}/colobot/sounds", "*.*"),
    Source("sfx", "supertux-data", f"{G}/supertux2/sounds", "*.*"),
    Source("sfx", "marsshooter-data", f"{G}/marsshooter/audio", "*/*.*", exclude=r"/(music|announcer)/"),
)


@dataclass
class Unit:
    """A unit of work: one music/sfx file, or all clips of one speech language in one split."""

    kind: str
    package: str
    split: str
    group: str
    sources: list[str]


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def split_of(source: str) -> str:
    """Train/val by a hash of the source path, so a file never straddles splits and reruns agree."""
    return "val" if int(digest(source)[:8], 16) % 1000 < VAL_PERMILLE else "train"


# ---------------------------------------------------------------- discovery
def list_sources(src: Source) -> list[str]:
    """Source ids of one table row: file paths, or `archive::member` for zip members."""
    root = Path(src.root)
    if not root.is_dir():
        log.warning("missing %s (%s): install the package", root, src.package)
        return []
    out = []
    for p in sorted(root.glob(src.pattern)):
        if not p.is_file() or (src.exclude and re.search(src.exclude, str(p))):
            continue
        if src.members and p.suffix.lower() in ARCHIVE_EXT:
            with zipfile.ZipFile(p) as z:
                out += [f"{p}::{m}" for m in sorted(z.namelist()) if fnmatch.fnmatch(m, src.members)]
        elif p.suffix.lower() in AUDIO_EXT:
            out.append(str(p))
    if bad := [s for s in out if any(b in s for b in BLOCKED)]:
        raise RuntimeError(f"dev-eval source in training table: {bad[0]}")
    return out


def speech_lang(src: Source, path: str) -> str:
    """Language of a speech clip: tuxpaint names it `*_desc_LANG.ogg`, klettres keeps one dir per language."""
    name = Path(path).name
    if "_desc_" in name:
        return name.split("_desc_")[-1].split(".")[0]
    return Path(path).relative_to(src.root).parts[0]


def discover(kinds: list[str], max_files: int | None, done: set[str]) -> list[Unit]:
    """Work units for the requested kinds, skipping files already in done.txt and dev-eval languages."""
    units: list[Unit] = []
    for src in (s for s in SOURCES if s.kind in kinds):
        files = sorted(list_sources(src), key=digest)[:max_files]  # hash order: a spread when capped
        if src.kind != "speech":
            units += [Unit(src.kind, src.package, split_of(f), "", [f]) for f in files if f not in done]
            continue
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        excluded = EXCLUDED_LANGS.get(src.package, set())
        for f in files:
            lang = speech_lang(src, f)
            if lang not in excluded and f not in done:
                groups[lang, split_of(f)].append(f)
        units += [Unit(src.kind, src.package, s, lang, fs) for (lang, s), fs in sorted(groups.items())]
    return units


# ---------------------------------------------------------------- decoding
def midi_seconds(data: bytes) -> float:
    """Length of a Standard MIDI File with tempo changes: the cap for a fluidsynth render."""
    division = int.from_bytes(data[12:14], "big")
    tempos, end, pos = [], 0, 8 + int.from_bytes(data[4:8], "big")
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4:pos + 8], "big")
        if data[pos:pos + 4] == b"MTrk":
            ticks, track_tempos = _scan_track(data[pos + 8:pos + 8 + size])
            end, tempos = max(end, ticks), tempos + track_tempos
        pos += 8 + size
    if division & 0x8000:  # SMPTE time: frames per second x ticks per frame
        return end / ((256 - (division >> 8)) * (division & 0xFF))
    seconds, last, tempo = 0.0, 0, 500_000
    for tick, new in sorted(t for t in tempos if t[0] <= end):
        seconds, last, tempo = seconds + (tick - last) * tempo / 1e6 / division, tick, new
    return seconds + (end - last) * tempo / 1e6 / division


def _scan_track(d: bytes) -> tuple[int, list[tuple[int, int]]]:
    def varlen(i: int) -> tuple[int, int]:
        v = 0
        while True:
            v, i = (v << 7) | (d[i] & 0x7F), i + 1
            if not d[i - 1] & 0x80:
                return v, i

    i, tick, status, tempos = 0, 0, 0, []
    while i < len(d):
        delta, i = varlen(i)
        tick += delta
        if d[i] == 0xFF:
            kind = d[i + 1]
            n, i = varlen(i + 2)
            if kind == 0x51:
                tempos.append((tick, int.from_bytes(d[i:i + 3], "big")))
            i += n
        elif d[i] in (0xF0, 0xF7):
            n, i = varlen(i + 1)
            i += n
        else:
            if d[i] & 0x80:
                status, i = d[i], i + 1
            i += 1 if status & 0xF0 in (0xC0, 0xD0) else 2
    return tick, tempos


def render_midi(path: str, sf2: str = SF2, timeout_s: int = 120) -> tuple[np.ndarray, int]:
    """fluidsynth render under a timeout, read from a pipe up to MIDI length + 3 s: renders can run away."""
    nbytes = int((midi_seconds(Path(path).read_bytes()) + 3.0) * SR) * 4  # s16 stereo
    cmd = ["timeout", str(timeout_s), "fluidsynth", "-q", "-ni", "-r", str(SR), "-T", "raw", "-O", "s16",
           "-F", "/dev/stdout", sf2, path]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        raw = proc.stdout.read(nbytes)
        proc.terminate()  # timeout passes it on to fluidsynth
    return np.frombuffer(raw[:len(raw) // 4 * 4], "<i2").reshape(-1, 2) / np.float32(32768), SR


def read_audio(source: str) -> tuple[np.ndarray, int]:
    """Decode a file, zip member or MIDI to mono float32; ffmpeg covers what libsndfile cannot read."""
    if source.endswith(".mid"):
        x, sr = render_midi(source)
        return x.mean(axis=1), sr
    data = None
    if "::" in source:
        archive, member = source.split("::", 1)
        with zipfile.ZipFile(archive) as z:
            data = z.read(member)
    try:
        x, sr = sf.read(io.BytesIO(data) if data is not None else source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError):
        cmd = ["ffmpeg", "-v", "error", "-i", "pipe:0" if data is not None else source, "-f", "wav", "-"]
        wav = subprocess.run(cmd, input=data, capture_output=True, check=True).stdout
        x, sr = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    return x.mean(axis=1), sr


# ---------------------------------------------------------------- signal processing
def to_48k(x: np.ndarray, sr: int) -> np.ndarray:
    if sr == SR:
        return x
    g = gcd(SR, sr)
    return resample_poly(x, SR // g, sr // g).astype(np.float32)


def trim_silence(x: np.ndarray, threshold: float = SILENCE) -> np.ndarray:
    """Drop leading/trailing digital silence so segments and hours count real sound."""
    idx = np.flatnonzero(np.abs(x) > threshold)
    return x[idx[0]:idx[-1] + 1] if idx.size else x[:0]


def cut_segments(x: np.ndarray, sr: int = SR, max_s: float = MAX_SEG_S,
                 min_s: float = MIN_SEG_S) -> list[np.ndarray]:
    """Equal pieces of at most max_s (no stub tail); pieces under min_s are too short to train on."""
    if len(x) < min_s * sr:
        return []
    n = ceil(len(x) / (max_s * sr))
    return [p for p in np.array_split(x, n) if len(p) >= min_s * sr]


def pack_speech(clips: Iterable[np.ndarray], sr: int = SR, target_s: float = SPEECH_TARGET_S,
                gap_s: float = SPEECH_GAP_S) -> Iterator[tuple[np.ndarray, list[int]]]:
    """Concatenate short clips with silent gaps into ~target_s segments; yields (audio, clip indices).

    Speech clips are 0.3-3 s, too short for training crops alone; a clip longer than target_s stands alone.
    """
    gap = np.zeros(int(round(gap_s * sr)), np.float32)
    buf: list[np.ndarray] = []
    idx: list[int] = []
    n = 0
    for i, clip in enumerate(clips):
        if buf and n + len(gap) + len(clip) > target_s * sr:
            yield np.concatenate(buf), idx
            buf, idx, n = [], [], 0
        if buf:
            buf.append(gap)
            n += len(gap)
        buf.append(clip.astype(np.float32))
        idx.append(i)
        n += len(clip)
    if buf:
        yield np.concatenate(buf), idx


# ---------------------------------------------------------------- building
def load_clip(source: str, min_s: float) -> tuple[np.ndarray, float, str]:
    """Decoded, 48 kHz, trimmed audio and its band edge; the reason string is empty when it is kept."""
    try:
        x, sr = read_audio(source)
    except Exception as e:
        return np.zeros(0, np.float32), 0.0, f"decode error: {type(e).__name__}: {e}"[:160]
    x = trim_silence(to_48k(x, sr))
    if len(x) < min_s * SR:
        return x, 0.0, "silent" if len(x) == 0 else "short"
    bw = min(band_edge_hz(x), sr / 2)  # resampling images sit ~55 dB down: not real content
    return x, bw, "" if bw >= MIN_BAND_HZ else "narrowband"


def process_unit(job: tuple[Unit, str]) -> tuple[Unit, list[dict], list[dict]]:
    """Decode, filter and write one unit's segments; returns (unit, manifest records, dropped records)."""
    unit, out = job
    kept: list[tuple[str, float]] = []
    dropped: list[dict] = []

    def clips() -> Iterator[np.ndarray]:
        for src in unit.sources:
            x, bw, reason = load_clip(src, SPEECH_MIN_S if unit.kind == "speech" else MIN_SEG_S)
            if reason:
                dropped.append(dict(source=src, kind=unit.kind, package=unit.package, split=unit.split,
                                    seconds=round(len(x) / SR, 3), band_hz=round(bw), reason=reason))
            else:
                kept.append((src, bw))
                yield x

    if unit.kind == "speech":
        packs = ((audio, [kept[i] for i in ids]) for audio, ids in pack_speech(clips()))
    else:
        packs = ((x, [kept[-1]]) for x in clips())
    records = []
    for audio, members in packs:
        srcs = [s for s, _ in members]
        for k, seg in enumerate(cut_segments(audio)):
            bw = min(band_edge_hz(seg), *(bw for _, bw in members))
            records.append(write_segment(Path(out), unit, srcs, seg, bw, k))
    return unit, records, dropped


def write_segment(out: Path, unit: Unit, srcs: list[str], seg: np.ndarray, bw: float, k: int) -> dict:
    """Write one FLAC segment; names hash their sources so reruns and resumed groups never collide."""
    stem = unit.group if unit.kind == "speech" else re.sub(r"[^\w.-]+", "_", Path(srcs[0]).stem)[:40]
    rel = f"{unit.split}/{unit.kind}/{unit.package}/{stem}_{digest('|'.join(srcs))[:10]}_{k:02d}.flac"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    sf.write(out / rel, np.clip(seg, -1.0, 1.0), SR, subtype="PCM_16", format="FLAC")
    rec = dict(path=rel, kind=unit.kind, package=unit.package, source=srcs[0],
               seconds=round(len(seg) / SR, 3), band_hz=round(bw), split=unit.split)
    if len(srcs) > 1:
        rec["sources"] = srcs  # speech: band_hz is the narrowest clip's
    return rec


def install_packages(kinds: list[str]) -> None:
    """apt-get the Debian packages that ship the requested kinds (needs root)."""
    pkgs = {s.package for s in SOURCES if s.kind in kinds} | set(RENDER_PACKAGES if "music" in kinds else ())
    subprocess.run(["apt-get", "update"], check=True)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *sorted(pkgs)], check=True)


def build(out: Path, kinds: list[str], jobs: int = 1, max_files: int | None = None,
          install: bool = False) -> None:
    """Build (or resume) the corpus: skips sources in done.txt, appends to manifest/dropped jsonl."""
    if install:
        install_packages(kinds)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "build.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    done_path = out / "done.txt"
    done = set(done_path.read_text().split("\n")) if done_path.exists() else set()
    units = discover(kinds, max_files, done)
    total = sum(len(u.sources) for u in units)
    log.info("build %s: %d units, %d files to do, %d done before", kinds, len(units), total, len(done))
    jobs_in = [(u, str(out)) for u in units]
    with (open(out / "manifest.jsonl", "a") as man, open(out / "dropped.jsonl", "a") as drop,
          open(done_path, "a") as dn, tqdm(total=total, unit="file", smoothing=0.05) as bar,
          Pool(jobs) if jobs > 1 else nullcontext() as pool):
        results = pool.imap_unordered(process_unit, jobs_in) if pool else map(process_unit, jobs_in)
        for unit, records, dropped in results:
            man.writelines(json.dumps(r) + "\n" for r in records)
            drop.writelines(json.dumps(r) + "\n" for r in dropped)
            dn.writelines(s + "\n" for s in unit.sources)
            for f in (man, drop, dn):
                f.flush()
            bar.update(len(unit.sources))
            bar.set_postfix_str(f"{unit.kind}/{unit.package}")
            reasons = Counter(d["reason"].split(":")[0] for d in dropped)
            log.info("%s/%s %s %s: %d files -> %d segments %.1f s; dropped %s", unit.kind, unit.package,
                     unit.split, unit.group or Path(unit.sources[0]).name, len(unit.sources), len(records),
                     sum(r["seconds"] for r in records), dict(reasons) or "none")
            for d in dropped:
                if d["reason"].startswith("decode"):
                    log.warning("%s: %s", d["source"], d["reason"])
    log.info("build finished")
    print(summary(out))


# ---------------------------------------------------------------- stats and pack
def read_jsonl(path: Path, key: str) -> list[dict]:
    """Records of a jsonl file, last one winning per key (a crash-resumed unit may repeat lines)."""
    if not path.exists():
        return []
    return list({(r := json.loads(line))[key]: r for line in path.read_text().splitlines() if line}.values())


def summary(corpus: Path) -> str:
    """Hours kept per kind/package/split and dropped (with reasons), from manifest and dropped jsonl."""
    rows: dict[tuple[str, str], Counter] = defaultdict(Counter)
    reasons: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in read_jsonl(corpus / "manifest.jsonl", "path"):
        for key in ((r["kind"], r["package"]), (r["kind"], "TOTAL")):
            rows[key][r["split"]] += r["seconds"] / 3600
            rows[key]["wide"] += r["seconds"] / 3600 * (r.get("band_hz", 0) >= 15_000)
            rows[key]["segments"] += 1
    for d in read_jsonl(corpus / "dropped.jsonl", "source"):
        for key in ((d["kind"], d["package"]), (d["kind"], "TOTAL")):
            rows[key]["dropped"] += d["seconds"] / 3600
            reasons[key][d["reason"].split(":")[0]] += 1
    row = "{:6} {:24} {:>8} {:>7} {:>9} {:>6} {:>7}  {}".format
    lines = [row("kind", "package", "train h", "val h", ">=15k h", "segs", "drop h", "dropped files")]
    for kind, pkg in sorted(rows, key=lambda k: (k[0], k[1] == "TOTAL", k[1])):
        c = rows[kind, pkg]
        why = " ".join(f"{k}={n}" for k, n in reasons[kind, pkg].most_common())
        hours = (f"{c[k]:.3f}" for k in ("train", "val", "wide"))
        lines.append(row(kind, pkg, *hours, c["segments"], f"{c['dropped']:.3f}", why))
    return "\n".join(lines)


def interleave(groups: list[list]) -> list:
    """Round-robin merge (item i of every group before item i+1 of any): spreads picks across groups."""
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def diverse_order(records: list[dict], rng: random.Random) -> list[dict]:
    """Shuffled order that cycles over packages, and within each package over source files."""
    by_pkg: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_pkg[r["package"]][r["source"]].append(r)
    per_pkg = []
    for pkg in sorted(by_pkg):
        per_src = [by_pkg[pkg][s] for s in sorted(by_pkg[pkg])]
        for s in per_src:
            rng.shuffle(s)
        rng.shuffle(per_src)
        per_pkg.append(interleave(per_src))
    rng.shuffle(per_pkg)
    return interleave(per_pkg)


def pack(corpus: Path, out: Path, max_mib: float, mix: dict[str, float], split: str = "train",
         seed: int = 0) -> None:
    """Copy a kind-balanced, package-diverse subset under max_mib of FLAC into out (ships to a GPU box)."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    rng = random.Random(seed)
    recs = sorted((r for r in read_jsonl(corpus / "manifest.jsonl", "path") if r["split"] == split),
                  key=lambda r: r["path"])
    budget, total = max_mib * 2**20, sum(mix.values())
    orders = {k: diverse_order([r for r in recs if r["kind"] == k], rng) for k in mix}
    chosen: dict[str, dict] = {}
    used = 0

    def take(order: list[dict], quota: float) -> None:
        nonlocal used
        spent = 0
        for r in order:
            size = (corpus / r["path"]).stat().st_size
            if r["path"] not in chosen and spent + size <= quota and used + size <= budget:
                chosen[r["path"]], spent, used = r, spent + size, used + size

    for kind, frac in mix.items():
        take(orders[kind], budget * frac / total)
    take(interleave(list(orders.values())), budget)  # leftover budget of a short kind goes to the others
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.jsonl", "w") as man:
        for r in chosen.values():
            (out / r["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(corpus / r["path"], out / r["path"])
            man.write(json.dumps(r) + "\n")
    print(f"packed {len(chosen)} segments, {used / 2**20:.1f} MiB into {out}")
    print(summary(out))


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    """Command-line entry: build | stats | pack."""
    ap = argparse.ArgumentParser(prog="python -m rtsr.training.corpus", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="decode, filter and segment the Debian sources")
    b.add_argument("--out", type=Path, default=Path("corpus"))
    b.add_argument("--install", action="store_true", help="apt-get install the source packages first")
    b.add_argument("--kinds", default="speech,music,sfx")
    b.add_argument("--max-files-per-package", type=int, default=None)
    b.add_argument("--jobs", type=int, default=1)
    s = sub.add_parser("stats", help="summary table from the manifest")
    s.add_argument("--corpus", type=Path, default=Path("corpus"))
    p = sub.add_parser("pack", help="copy a kind-balanced subset under a size limit")
    p.add_argument("--corpus", type=Path, default=Path("corpus"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-mib", type=float, default=55.0)
    p.add_argument("--mix", default="speech=0.3,music=0.4,sfx=0.3")
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "build":
        kinds = [k for k in a.kinds.split(",") if k]
        if unknown := set(kinds) - set(KINDS):
            ap.error(f"unknown kinds {unknown}")
        build(a.out, kinds, a.jobs, a.max_files_per_package, a.install)
    elif a.cmd == "stats":
        print(summary(a.corpus))
    else:
        mix = {k: float(v) for k, v in (kv.split("=") for kv in a.mix.split(","))}
        pack(a.corpus, a.out, a.max_mib, mix, a.split, a.seed)


if __name__ == "__main__":
    main()
