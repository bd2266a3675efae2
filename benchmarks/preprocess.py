"""mbm preprocess vs the alternatives a user would write, side by side on one dataset.

Builds a dataset from the bundled sample media repeated to --samples unique ids (``incremental.build``)
and runs, --reps times each and interleaved: ``mbm preprocess`` (Beam, one worker per core), the
single-process PyTorch loop (``baseline_loop.py``) and ``datasets.map`` with one process per core
(``baseline_hf.py``). All three read the input with mbm's readers, do the same decode, cleaning and
extraction with the same models and batch size, and write float16 features into WebDataset tars; the
samples they land (counts per modality and ids) are compared. For each run: wall time of the whole
process (start-up and model loading included), samples/s (input samples and rejects mbm's readers
find, per second), and peak memory summed over the process tree (RSS, and PSS, which counts pages
shared between forked workers once). Prints a table and, with --write, updates the section in
docs/benchmarks.md.

--source PATH runs them on your data instead, anything ``mbm preprocess`` reads:

- a manifest (.jsonl/.json/.csv/.tsv/.parquet, maybe compressed; mbm's columns, media paths relative
  to it) or a folder holding one named ``manifest.*``: its rows repeated to --samples with unique ids
  (default 2000; a Parquet manifest whose cells hold media bytes, as ``datasets`` exports images, is
  repeated as Parquet), or taken as they are with --samples 0;
- an imagefolder/audiofolder (any other folder; with or without metadata.jsonl/csv/parquet), one tar,
  a folder of ``*.tar`` or a glob/brace pattern of tars (quoted): used as they are, in place (so relative
  paths in metadata files keep resolving); --samples cannot change their size and is refused;
- a job spec (.toml): its [input] as it is (whatever its kind), its [text]/[image]/[audio] cleaning and
  [extract] settings; its [output] is replaced by a temporary folder and its [runner] left out (all
  three run here, mbm with one worker per core). --samples is refused as for a folder.

--stock makes the baselines load the default models as a user's own script does (transformers'
``AutoModel`` for MiniLM, eager EfficientNet-Lite0 in NCHW; ``stock_models.py``) instead of calling mbm's
extractor classes, whose optimizations they otherwise share: what a user gains over the code they would
write, rather than over mbm's models run without mbm's runtime.

--captions K runs them on a caption dataset instead (``captions.py``): --samples rows, each of --samples / K
pictures (unique, cut from the sample photos) under K captions, rows shuffled, as COCO (K = 5) holds them;
mbm with ``[runner] dedupe`` (its default: each picture decoded and featurized once), and again without.

--memory also runs ``mbm preprocess`` on the data at 1x and 4x its size (a manifest's rows repeated, tars
written once and four times with unique keys, or an imagefolder/audiofolder's files linked four times
under new names with its metadata rows repeated to name them) and reports the growth of its peak
memory; ``--reps 0 --memory`` runs that check alone. A job spec's [input] is repeated the same way, its
cleaning and extraction settings kept.

    .venv/bin/python benchmarks/preprocess.py --samples 2000 --reps 3 --write
    .venv/bin/python benchmarks/preprocess.py --source 'data/shard-{0000..0009}.tar' --reps 1 --memory
    .venv/bin/python benchmarks/preprocess.py --samples 2000 --reps 2 --stock
    .venv/bin/python benchmarks/preprocess.py --samples 2000 --reps 3 --captions 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from captions import build_captions
from incremental import build, is_manifest, manifest_of, source_rows
from report import cores_description, cpu_description, write_section

from jobs.spec import SpecError, dump_toml, load_spec
from pipelines import proctree
from pipelines.readers.folder import METADATA_NAMES
from pipelines.readers.rows import format_of

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
HEAD = "## Preprocessing vs a plain loop and HF datasets.map"
MODALITIES = ("text", "image", "audio")
DEFAULT_SAMPLES = 2000  # the bundled sample, or a manifest --source, repeated to this many
# --source kinds used as they are (only a manifest's rows can be repeated), as error messages name them
KINDS = {"folder": "an imagefolder/audiofolder", "shards": "WebDataset tars", "spec": "a job spec"}


def commands(spec: Path, out: Path, stock: bool = False) -> dict[str, list[str]]:
    """Each pipeline's command line; ``stock``: the baselines load the default models as a user's script
    does (``stock_models``), and their names say so. A spec with a ``job-no-dedupe.toml`` beside it (the
    caption data) runs mbm a second time with that one."""
    py = sys.executable
    flag, named = (["--stock"], " (stock models)") if stock else ([], "")
    mbm = [py, "-m", "jobs.cli", "preprocess", "--no-progress", "--output", str(out)]
    no_dedupe = spec.parent / "job-no-dedupe.toml"
    return {
        "mbm preprocess": [*mbm, str(spec)],
        **({"mbm preprocess, dedupe off": [*mbm, str(no_dedupe)]} if no_dedupe.is_file() else {}),
        f"plain loop{named}": [py, str(HERE / "baseline_loop.py"), str(spec), "--output", str(out), *flag],
        f"HF datasets.map{named}": [py, str(HERE / "baseline_hf.py"), str(spec), "--output", str(out), *flag],
    }


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    return [root, *proctree.descendants(root)]


def rss_kib(pid: int) -> int:
    """Resident set of one process in KiB from /proc/PID/statm (cheap); 0 when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, IndexError, ValueError):
        return 0


def pss_kib(pid: int) -> int:
    """Proportional set of one process in KiB from /proc/PID/smaps_rollup; 0 when it is gone.

    Reading it walks the process's page tables (about 13 ms for a 1.5 GB process here) and holds
    its memory-map lock meanwhile, so it is sampled less often than RSS.
    """
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == "Pss":
            return int(rest.split()[0])
    return 0


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def role(pid: int, root: int) -> str:
    """What a process of an ``mbm preprocess`` tree is: the driver, the fork server, a worker (forked by
    the fork server, or started by Beam), or a launcher (the ``sh`` and client Beam starts per worker)."""
    if pid == root:
        return "driver"
    cmdline = _cmdline(pid)
    if b"pipelines.forkserver" in cmdline:
        up = proctree.parent(pid)
        return "worker" if up != root and b"pipelines.forkserver" in _cmdline(up) else "fork server"
    if b"pipelines.forkclient" in cmdline or cmdline.startswith(b"/bin/sh"):
        return "launcher"
    return "worker"


class TreeMemory(threading.Thread):
    """Peak RSS (every ``interval`` s) and PSS (every ``pss_every`` samples) summed over a process tree,
    and each process's PSS at the PSS peak (``peak_parts``: (``role``, MiB) pairs).

    Sampling is kept light: a monitor that read smaps every 0.2 s took a quarter of a core from the
    measured pipelines, and more from those with more processes.
    """

    def __init__(self, pid: int, interval: float = 0.25, pss_every: int = 8) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.peak_rss = self.peak_pss = 0  # KiB
        self.peak_parts: list[tuple[str, float]] = []
        self._done = threading.Event()

    def run(self) -> None:
        tick = 0
        rss_at_pss, pss_tick = 0, -self.pss_every  # the tree's RSS when PSS was last read, and when
        while not self._done.is_set():
            tree = descendants(self.pid)
            rss = sum(rss_kib(p) for p in tree)
            self.peak_rss = max(self.peak_rss, rss)
            # PSS is read every pss_every samples, and sooner (every other sample at most) once RSS has
            # grown a quarter since the last read: a run shorter than pss_every samples had its PSS read
            # once, at its start (1 MiB)
            if tick - pss_tick >= self.pss_every or (rss > rss_at_pss * 1.25 and tick - pss_tick >= 2):
                rss_at_pss, pss_tick = rss, tick
                parts = {p: pss_kib(p) for p in tree}
                total = sum(parts.values())
                if total > self.peak_pss:
                    self.peak_pss = total
                    self.peak_parts = sorted(((role(p, self.pid), kib / 1024) for p, kib in parts.items()
                                              if kib >= 1024),
                                             key=lambda x: (x[0], -x[1]))
            tick += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def parts_text(parts: list[tuple[str, float]]) -> str:
    """``driver 196, fork server 347, worker 330 / 290`` (MiB of PSS per process, by role)."""
    by_role: dict[str, list[float]] = {}
    for name, mib in parts:
        by_role.setdefault(name, []).append(mib)
    return ", ".join(f"{name} {' / '.join(f'{m:.0f}' for m in mibs)}" for name, mibs in by_role.items())


def measure(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` to completion; wall seconds and peak tree memory. Fails loudly on a non-zero exit."""
    start = time.perf_counter()
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        mem = TreeMemory(proc.pid)
        mem.start()
        rc = proc.wait()
        wall = time.perf_counter() - start
        mem.stop()
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd)} exited {rc}; last output:\n{tail}")
    return {"wall": wall, "rss": mem.peak_rss / 1024, "pss": mem.peak_pss / 1024, "parts": mem.peak_parts}


def landed(out: Path) -> tuple[Counter, list[str]]:
    """Samples and features per modality in every tar under ``out``, and the sorted sample keys (what a
    reader would get): equal counts alone could hide two pipelines landing different samples."""
    counts: Counter = Counter()
    keys = []
    for tar in sorted(out.rglob("*.tar")):
        with tarfile.open(tar) as t:
            for name in t.getnames():
                key, _, suffix = name.partition(".")
                if suffix == "json":
                    counts["samples"] += 1
                    keys.append(key)
                elif suffix.endswith(".npy"):
                    counts[suffix[:-4]] += 1
    return counts, sorted(keys)


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (f"{platform.machine()}, {cores_description()} ({cpu_description()}), {ram:.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__}, no GPU used")


def stats(xs: list[float]) -> str:
    med = statistics.median(xs)
    return f"{med:.1f}" if len(xs) == 1 else f"{med:.1f} ({min(xs):.1f}–{max(xs):.1f})"


def table(results: dict[str, list[dict]], n: int) -> list[str]:
    lines = [
        "| pipeline | wall s, median (min–max) | samples/s | peak RSS MiB, tree | peak PSS MiB, tree "
        "| mbm speed / this |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    mbm = statistics.median(r["wall"] for r in results["mbm preprocess"])
    for name, runs in results.items():
        walls = [r["wall"] for r in runs]
        lines.append(f"| {name} | {stats(walls)} | {stats([n / w for w in walls])} | "
                     f"{statistics.median(r['rss'] for r in runs):.0f} | {statistics.median(r['pss'] for r in runs):.0f} "
                     f"| {statistics.median(walls) / mbm:.2f}x |")
    return lines


def source_kind(source: Path) -> str:
    """What ``--source`` is, told the way a user names an input: ``"spec"`` (a ``.toml``), ``"manifest"``
    (a manifest file, or a folder holding a ``manifest.*``), ``"shards"`` (a tar, a folder with ``*.tar``
    in it, which mbm reads as its tars, or a glob/brace pattern) or ``"folder"`` (any other folder, an
    imagefolder/audiofolder). Raises ``ValueError`` for a path that is none of them."""
    if source.is_file():
        if source.suffix == ".toml":
            return "spec"
        if format_of(str(source)) is not None:
            return "manifest"
        if ".tar" in source.suffixes or source.suffix == ".tgz" or tarfile.is_tarfile(source):
            return "shards"
        raise ValueError(f"--source {source}: not a manifest (.jsonl/.json/.csv/.tsv/.parquet), a tar or a job "
                         "spec (.toml)")
    if source.is_dir():
        if any(is_manifest(p) for p in source.glob("*")):
            return "manifest"
        return "shards" if any(source.glob("*.tar")) else "folder"
    if re.search(r"[*?\[{]", str(source)):
        return "shards"
    raise ValueError(f"--source {source} does not exist")


def spec_tables(job: Path) -> dict:
    """A job spec's [input], cleaning and [extract] tables, resolved (its relative paths made absolute, so
    they hold from another folder); [output] and [runner] are left for the benchmark to set."""
    try:
        tables = load_spec(job).to_dict()
    except SpecError as e:
        raise SystemExit(f"--source {job}: {e}") from None
    return {k: v for k, v in tables.items() if k not in ("output", "runner")}


def dataset(folder: Path, n: int, precision: dict[str, str] | None = None, source: Path | None = None,
            repeated: bool = False, captions: int = 0) -> Path:
    """The job spec ``folder/job.toml`` the three pipelines run (with ``precision``, modality -> extractor
    precision, in its [extract] sections), writing into ``folder/out``.

    The sample media, or a manifest ``source``'s rows, are repeated to ``n`` samples under ``folder/data``
    (``incremental.build``); any other ``source`` is read where it is, as it is (``n`` is not used).
    Data repeated here (or ``repeated``: by the caller) is run with ``[runner] dedupe = false``: mbm would
    extract each medium once and copy its features to the copies (``pipelines.dedupe``), where the
    baselines extract each copy. Data as it is (or the first ``n`` rows of a manifest that has more)
    keeps dedupe on: repeats there are the data's own.
    ``captions``: ``n`` rows of a caption dataset instead (``captions.build_captions``), with a
    ``job-no-dedupe.toml`` beside the spec that turns dedupe off.
    """
    kind = source_kind(source) if source else "manifest"
    folder.mkdir(parents=True, exist_ok=True)
    if captions:
        tables = {"input": {"manifest": str(build_captions(folder / "data", n, captions))}}
        tables["output"] = {"dir": "out"}
        (folder / "job-no-dedupe.toml").write_text(dump_toml({**tables, "runner": {"dedupe": False}}))
    elif kind == "spec":
        tables = spec_tables(source)
    elif kind == "manifest":
        build(folder / "data", n, source)
        tables = {"input": {"manifest": str(folder / "data" / manifest_of(folder / "data"))}}
        if source is not None:  # a user's manifest may name its media by absolute paths
            tables["input"]["allow_outside"] = True
        repeated = repeated or (n > 0 and (source is None or n > _row_count(source)))
    else:
        tables = {"input": {kind: os.path.abspath(source)}}
    tables["output"] = {"dir": "out"}
    if repeated:
        tables["runner"] = {"dedupe": False}
    for m, p in sorted((precision or {}).items()):
        tables.setdefault("extract", {}).setdefault(m, {})["precision"] = p
    spec = folder / "job.toml"
    spec.write_text(dump_toml(tables))
    return spec


def _row_count(source: Path) -> int:
    """Readable rows of a manifest ``source``; 0 where they cannot be told (a Parquet with media bytes)."""
    from incremental import source_manifest

    try:
        return len(source_rows(source_manifest(source)))
    except SystemExit:
        return 0


def input_count(spec: Path) -> int:
    """Inputs the pipelines are given: the samples and rejects mbm's readers yield for the spec's [input]
    (a manifest's non-blank lines; a folder's media files, other files or metadata rows; a tar's samples)."""
    from baseline_loop import iter_source

    try:
        config = load_spec(spec).input
    except SpecError as e:  # a pattern that matches nothing, a model path the spec names that is not here
        raise SystemExit(f"the benchmark's job spec cannot run: {e}") from None
    return sum(1 for _ in iter_source(config))


def precision_arg(text: str) -> tuple[str, str]:
    """``MODALITY=PRECISION`` from the command line."""
    modality, _, value = text.partition("=")
    if modality not in MODALITIES or value not in ("auto", "float32", "bfloat16"):
        raise argparse.ArgumentTypeError(f"expected MODALITY=PRECISION (text|image|audio = auto|float32|bfloat16), "
                                         f"got {text!r}")
    return modality, value


TAR_WRITE_MODES = {".gz": "w:gz", ".tgz": "w:gz", ".bz2": "w:bz2", ".tbz": "w:bz2", ".tbz2": "w:bz2",
                   ".xz": "w:xz", ".txz": "w:xz"}


def repeat_tars(source: Path, dest: Path, factor: int) -> Path:
    """The tars ``source`` names, written ``factor`` times into ``dest`` with unique keys (copy i's member
    names, and the ``key`` of their json, prefixed ``c{i}-``), compressed as the originals (a .tar.zst is
    refused: tarfile cannot write it); returns the pattern of the copies. Regular members only."""
    import io
    import posixpath

    from pipelines.readers.source import expand_shards

    dest.mkdir(parents=True, exist_ok=True)
    for n, path in enumerate(expand_shards(str(source))):
        suffix = Path(path).suffix.lower()
        if suffix in (".zst", ".tzst"):
            raise SystemExit(f"--memory: {path} is zstd-compressed, which this benchmark cannot write 4 copies "
                             "of; decompress the tars (zstd -d) and point --source at those")
        for i in range(factor):
            out = dest / f"c{i}-{n:05d}-{Path(path).name}"
            with tarfile.open(path, "r:*") as src, tarfile.open(out, TAR_WRITE_MODES.get(suffix, "w")) as dst:
                for info in src:
                    if not info.isreg():
                        continue
                    data = src.extractfile(info).read()
                    folder, base = posixpath.split(info.name)
                    if base.partition(".")[2].lower() == "json":
                        try:
                            doc = json.loads(data)
                        except ValueError:
                            doc = None
                        if isinstance(doc, dict) and isinstance(doc.get("key"), str | int):
                            doc["key"] = f"c{i}-{doc['key']}"
                            data = json.dumps(doc).encode()
                    copy = tarfile.TarInfo(posixpath.join(folder, f"c{i}-{base}"))
                    copy.size, copy.mode = len(data), info.mode
                    dst.addfile(copy, io.BytesIO(data))
    return dest / "c*"  # a pattern: mbm reads a folder's *.tar only, and the copies may be compressed


def _copy_name(name: str, i: int) -> str:
    """``name`` (a path relative to some folder) with its file name prefixed ``c{i}-``."""
    folder, base = os.path.split(name)
    return os.path.join(folder, f"c{i}-{base}")


def _repeat_metadata(src: Path, dst: Path, factor: int) -> None:
    """A folder's metadata file with each row written ``factor`` times, copy i's ``file_name`` prefixed as
    its file is (``_copy_name``); a JSON line that is not an object with a ``file_name`` is kept as it is
    in every copy (a bad row is a reject per copy, as in the data repeated)."""
    if src.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(src)
        column = table.schema.get_field_index("file_name")
        if column < 0:
            raise SystemExit(f"--memory: {src} has no file_name column")
        names = table.column(column).to_pylist()
        copies = [table.set_column(column, "file_name", pa.array(
            [None if n is None else _copy_name(str(n), i) for n in names], pa.string())) for i in range(factor)]
        pq.write_table(pa.concat_tables(copies), dst)
    elif src.name.endswith(".csv"):
        import csv

        with open(src, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            rows, fields = list(reader), reader.fieldnames or []
        with open(dst, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for i in range(factor):
                writer.writerows({**r, "file_name": _copy_name(r["file_name"], i)} if r.get("file_name") else r
                                 for r in rows)
    else:
        lines = src.read_bytes().splitlines()
        with open(dst, "wb") as f:
            for i in range(factor):
                for line in lines:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    if isinstance(row, dict) and isinstance(row.get("file_name"), str):
                        line = json.dumps({**row, "file_name": _copy_name(row["file_name"], i)}).encode()
                    f.write(line + b"\n")


def repeat_folder(source: Path, dest: Path, factor: int) -> Path:
    """An imagefolder/audiofolder ``source`` repeated ``factor`` times into ``dest``: the same folders, each
    file there ``factor`` times as symlinks named ``c{i}-NAME`` to the original (so a file's ``.txt`` or
    ``.json`` partner keeps its name's match, and class folders their labels), and each metadata file's
    rows repeated to name the copies (``_repeat_metadata``). Returns ``dest``."""
    for folder, dirs, files in os.walk(source, followlinks=True):
        dirs.sort()
        rel = os.path.relpath(folder, source)
        out = dest / rel
        out.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            real = os.path.realpath(os.path.join(folder, name))
            if name in METADATA_NAMES:
                _repeat_metadata(Path(real), out / name, factor)
                continue
            for i in range(factor):
                (out / _copy_name(name, i)).symlink_to(real)
    return dest


def repeat_as_is(kind: str, source: Path, data: Path, factor: int) -> Path:
    """WebDataset tars (``kind`` "shards") or an imagefolder/audiofolder ("folder") written ``factor``
    times under ``data`` (``repeat_tars``, ``repeat_folder``); returns what to read them as."""
    if kind == "shards":
        return repeat_tars(source, data / "tars", factor)
    return repeat_folder(source, data / "folder", factor)


def spec_input(job: Path, tables: dict | None = None) -> tuple[str, str]:
    """(kind, path) of a job spec's [input]: ``manifest``, ``folder`` or ``shards``, and where; ``SystemExit``
    when that is not on this machine (the memory check copies it)."""
    tables = tables or spec_tables(job)
    (kind, where), = ((k, v) for k, v in tables["input"].items() if k in ("manifest", "folder", "shards") and v)
    if "://" in where:
        raise SystemExit(f"--memory: the [input] {kind} of {job} is not on this machine ({where}); the memory "
                         "check repeats the data, which it can do to local data only")
    return kind, where


def repeat_spec(job: Path, data: Path, factor: int) -> Path:
    """The job spec ``job`` with its [input] repeated ``factor`` times under ``data`` (a manifest's readable
    rows with unique ids, ``repeat_tars``, ``repeat_folder``) and its cleaning and [extract] settings as
    they are; returns the spec written there, whose [output] is ``data/out``."""
    tables = spec_tables(job)
    kind, where = spec_input(job, tables)
    data.mkdir(parents=True, exist_ok=True)
    if kind == "manifest":
        build(data / "data", factor * len(source_rows(Path(where))), Path(where))
        copy = data / "data" / manifest_of(data / "data")
    else:
        copy = repeat_as_is(kind, Path(where), data, factor)
    tables["input"] = {kind: str(copy), **({"allow_outside": True} if tables["input"].get("allow_outside") else {})}
    tables["output"] = {"dir": "out"}
    tables["runner"] = {"dedupe": False}  # the copies are the same media: each is extracted, as at 1x
    spec = data / "job.toml"
    spec.write_text(dump_toml(tables))
    return spec


def memory_growth(tmp: Path, n: int, source: Path | None = None, captions: int = 0) -> list[str]:
    """Peak memory of ``mbm preprocess`` on the dataset at 1x and 4x ``n`` samples (one run each); WebDataset
    tars (``source``) are written once and four times with unique keys (``repeat_tars``), an imagefolder/
    audiofolder's files linked once and four times (``repeat_folder``); the caption dataset (``captions``)
    built with four times the pictures, dedupe on."""
    rows, peaks = [], {}
    kind = source_kind(source) if source is not None else "manifest"
    for factor in (1, 4):
        data = tmp / f"mem-{factor}x"
        if captions:
            spec = dataset(data, factor * n, captions=captions)
        elif kind == "manifest":
            spec = dataset(data, factor * n, source=source)
        else:  # used as they are: n is what the copies hold, per copy
            spec = (repeat_spec(source, data, factor) if kind == "spec"
                    else dataset(data, 0, source=repeat_as_is(kind, source, data, factor), repeated=True))
            n = input_count(spec) // factor
        r = measure(commands(spec, data / "out")["mbm preprocess"], data / "run.log")
        peaks[factor] = r
        print(f"memory {factor}x: {factor * n} samples, {r['wall']:.1f} s, RSS {r['rss']:.0f} MiB, "
              f"PSS {r['pss']:.0f} MiB; at the PSS peak: {parts_text(r['parts'])}", file=sys.stderr, flush=True)
        rows.append(f"| {factor}× | {factor * n} | {r['wall']:.1f} | {r['rss']:.0f} | {r['pss']:.0f} |")
    ratio_rss = peaks[4]["rss"] / peaks[1]["rss"]
    ratio_pss = peaks[4]["pss"] / peaks[1]["pss"]
    verdict = "met" if max(ratio_rss, ratio_pss) <= 1.2 else "**not met**"
    return [
        "",
        "**Preprocessing memory**: one `mbm preprocess` run on the same data at 1× and 4× the samples, peak "
        "over the process tree (driver, worker fork server, workers).",
        "",
        "| dataset | samples | wall s | peak RSS MiB, tree | peak PSS MiB, tree |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"4× / 1×: RSS {ratio_rss:.2f}, PSS {ratio_pss:.2f} (target ≤ 1.2: {verdict}).",
    ]


def profile(spec: Path, tmp: Path, stock: bool = False) -> None:
    """Run the loop baseline (``stock``: with the models as a user's script loads them, as timed) under
    cProfile and print the top 15 cumulative entries."""
    import pstats

    prof = tmp / "loop.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), str(HERE / "baseline_loop.py"), str(spec),
           "--output", str(tmp / "profile"), *(["--stock"] if stock else [])]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    print("\nplain loop under cProfile, top 15 by cumulative time:")
    pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(15)
    stages = json.loads((tmp / "profile" / "baseline.json").read_text())["seconds"]
    print("profiled plain loop, seconds per stage:", ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))


def write_doc(table_lines: list[str], args: argparse.Namespace, counts: str, loop_stages: str,
              extra: list[str] | None = None) -> None:
    body = "\n".join([
        f"Reproduce: `.venv/bin/python benchmarks/preprocess.py --samples {args.samples} --reps {args.reps} "
        f"{'--memory ' if extra else ''}--write`",
        "",
        f"Machine: {machine()}. {args.samples} samples (sample media repeated, unique ids, varied captions), "
        "default extractors (MiniLM, EfficientNet-Lite0, log-mel) and batch sizes (text 128, image and audio 32), on the CPU. All three run "
        "mbm's readers, cleaners and extractors and write float16 features to WebDataset tars; the baselines "
        "skip bad samples where mbm also writes reject rows, a Parquet index and a dataset version. Wall time "
        "of the whole process (start-up and model loading included), interleaved runs; memory is the peak "
        "over the process tree, RSS sampled every 0.25 s and PSS every 2 s (RSS counts pages shared by forked "
        "workers once per worker, PSS splits them). mbm: Beam FnApiRunner, one worker per core; plain loop: "
        "one process, torch threads = cores; HF: `datasets.map(batched=True, batch_size=<largest per-modality batch>, num_proc=cores)`, "
        "one torch thread per worker. The baselines call mbm's extractor classes, so what those do "
        "(fused convolutions, fixed-shape text passes, MiniLM without transformers) they do too; what only mbm's runtime does is "
        "its process layout, batches that fill the forward passes (`FillBatches`) and the allocator settings of "
        "`mbm/alloc.py`. The media repeat, so mbm runs with `[runner] dedupe = false`: each copy extracted, as the "
        "baselines do.",
        "",
        *table_lines,
        "",
        f"Landed samples (text / image / audio features): {counts}.",
        f"Plain loop, seconds per stage (last run): {loop_stages}.",
        *(extra or []),
    ])
    write_section(HEAD, body)


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses settings that cannot work together; sets ``--samples`` from the kind of data: its default
    for what can be repeated (the bundled sample, a manifest), 0 (as it is) for what cannot."""
    if (args.precision or args.source or args.stock or args.captions) and args.write:
        ap.error("--write records the bundled sample with the default settings; leave out --precision, --source, "
                 "--stock and --captions")
    if args.captions and args.source:
        ap.error("--captions builds its own caption dataset from the bundled sample; leave out --source")
    if args.captions == 1 or args.captions < 0:
        ap.error(f"--captions {args.captions}: give the captions a picture has, 2 or more")
    if args.stock and args.precision:
        ap.error("--stock runs the baselines' stock models in float32, as a user's script does; leave out --precision")
    try:
        kind = source_kind(args.source) if args.source else "manifest"
    except ValueError as e:
        ap.error(str(e))
    if kind != "manifest":
        if args.samples:
            ap.error(f"--samples {args.samples}: --source {args.source} is {KINDS[kind]}, used as it is (only a "
                     "manifest's rows are repeated to --samples); leave out --samples")
        if args.memory and kind == "spec":
            try:
                spec_input(args.source)
            except SystemExit as e:
                ap.error(str(e))
        args.samples = 0
    elif args.samples is None:
        args.samples = DEFAULT_SAMPLES
    elif args.samples < (0 if args.source else 1):
        ap.error("--samples must be >= 1 (0 with --source: each of its rows once)")
    if args.reps < (0 if args.memory else 1):
        ap.error(f"--reps {args.reps}: give 1 or more (0 only with --memory: the memory check alone)")
    if args.reps == 0 and (args.write or args.profile):
        ap.error("--reps 0 runs the memory check alone; --write and --profile need the side-by-side runs")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=None,
                    help=f"samples built from the bundled sample or a manifest --source, its rows repeated with "
                         f"unique ids (default {DEFAULT_SAMPLES}; 0 with a manifest: its rows as they are); other "
                         "--source kinds are used as they are and refuse it")
    ap.add_argument("--reps", type=int, default=3, help="runs of each pipeline (0 with --memory: that check alone)")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--profile", action="store_true", help="also run the plain loop under cProfile")
    ap.add_argument("--memory", action="store_true",
                    help="also measure mbm's peak memory at 1x and 4x --samples (one run each; the bundled sample, a "
                         "manifest --source, tars written four times with unique keys, or a folder's files linked "
                         "four times)")
    ap.add_argument("--precision", type=precision_arg, action="append", default=[], metavar="MODALITY=PRECISION",
                    help="an extractor's compute precision for all three pipelines, e.g. text=bfloat16 (repeatable)")
    ap.add_argument("--stock", action="store_true",
                    help="the baselines load the default models as a user's own script does (transformers' AutoModel "
                         "for MiniLM, eager EfficientNet-Lite0 in NCHW; benchmarks/stock_models.py) instead of calling "
                         "mbm's extractor classes")
    ap.add_argument("--captions", type=int, default=0, metavar="K",
                    help="a caption dataset instead of the bundled sample: --samples rows, K captions a picture "
                         "(unique pictures), as COCO (K = 5); mbm runs with dedupe and again without")
    ap.add_argument("--source", type=Path, default=None, metavar="PATH",
                    help="your data, anything mbm preprocess reads: a manifest (.jsonl/.json/.csv/.tsv/.parquet, "
                         "mbm's columns, media paths relative to it) or a folder with one named manifest.*, its rows "
                         "repeated to --samples; an imagefolder/audiofolder (any other folder), a tar, a folder of "
                         "*.tar or a quoted glob/brace pattern of tars, used as they are; or a job spec (.toml), "
                         "whose [input] (as it is), cleaning and [extract] settings are used")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    has_hf = importlib.util.find_spec("datasets") is not None
    if not has_hf:
        print("HF datasets is not installed (pip install -e '.[dev,bench]'): skipping the datasets.map baseline",
              file=sys.stderr)
    results: dict[str, list[dict]] = {}
    counts: dict[str, Counter] = {}
    keys: dict[str, list[str]] = {}
    loop_stages = ""
    reasons: dict[str, int] = {}  # mbm's rejects by reason
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = dataset(tmp, args.samples, dict(args.precision), args.source, captions=args.captions)
        n = input_count(spec)
        for rep in range(args.reps):
            for i, name in enumerate(commands(spec, tmp, args.stock)):
                if name.startswith("HF") and not has_hf:
                    continue
                out = tmp / f"run-{rep}-{i}"  # a fresh output folder for every run
                r = measure(commands(spec, out, args.stock)[name], tmp / f"{out.name}.log")
                results.setdefault(name, []).append(r)
                counts[name], keys[name] = landed(out)
                if name.startswith("mbm") and (out / "report.json").is_file():
                    reasons = json.loads((out / "report.json").read_text()).get("rejected_by_reason", {})
                print(f"rep {rep + 1}/{args.reps} {name}: {r['wall']:.1f} s, {counts[name]['samples']} landed",
                      file=sys.stderr, flush=True)
                if name.startswith("plain loop"):
                    stages = json.loads((out / "baseline.json").read_text())["seconds"]
                    loop_stages = ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
        if args.profile:
            profile(spec, tmp, args.stock)
        extra = memory_growth(tmp, n, args.source, args.captions) if args.memory else []
    if not results:  # --reps 0: the memory check alone
        print("\n".join(extra))
        return 0
    lines = table(results, n)
    shown = {name: f"{c['samples']} ({c['text']} / {c['image']} / {c['audio']})" for name, c in counts.items()}
    same_counts = len({(c["samples"], c["text"], c["image"], c["audio"]) for c in counts.values()}) == 1
    same = same_counts and len({tuple(k) for k in keys.values()}) == 1
    first = next(iter(shown.values()))
    summary = (", ".join(f"{name} {s}" for name, s in shown.items()) if not same_counts
               else f"{first}, the same for all" if same else f"{first} for all, but not the same sample ids")
    print("\n".join(lines))
    print(f"\nlanded samples (text / image / audio): {summary}")
    print(f"plain loop seconds per stage: {loop_stages}")
    if not same:
        print("WARNING: the pipelines landed different samples; the comparison is not like for like", file=sys.stderr)
    landed_n = next(iter(counts.values()))["samples"]
    if landed_n < n / 2:
        top = ", ".join(f"{r} {k}" for r, k in sorted(reasons.items(), key=lambda x: -x[1])[:3])
        print(f"WARNING: {landed_n} of {n} inputs landed; the rest were rejected ({top}): the figures are of "
              "what landed", file=sys.stderr)
    if extra:
        print("\n".join(extra))
    if args.write:
        write_doc(lines, args, summary, loop_stages, extra)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
