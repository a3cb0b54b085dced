"""The benchmark suite's one entry point: every comparison in one run, one table of ratios.

In: image sizes on the command line (defaults that finish in a few minutes on
2 cores).  What it does, on this machine, in one run:

- runs each per-area script as a subprocess with sizes derived from those
  options (``bench_local``: checksum vs xxh128sum, convert vs cp --sparse;
  ``bench_decoders``: convert vs qemu-img convert and the decompressors;
  ``bench_upload``: upload vs curl --upload-file; ``bench_download``: download
  vs curl -o; ``bench_chunked``: chunked vs direct), each in its own
  sub-directory of the work directory;
- times the one-step uploads itself: ``drivepipe upload`` of a zlib qcow2 and of
  a gzip file against ``qemu-img convert`` / ``gunzip`` to a raw file followed by
  ``curl --upload-file`` (the two steps a user would otherwise run), to the
  local drive store, reusing bench_upload's store and curl set-up;
- collects every row that carries a ratio from the scripts' markdown tables.

Out: one markdown table (area, comparison, ratio drivepipe/reference - below
1.00x drivepipe is faster -, peak RSS of each side) on stdout, followed by each
script's own tables; with ``--write`` also ``benchmarks/RESULTS.md`` with the
machine it ran on (CPU, cores, RAM, kernel, filesystem, tool versions).  A
script that fails is reported as a failed row; the others still run.

    python benchmarks/run.py                                    # defaults, a few minutes
    python benchmarks/run.py --dense 4G --sparse 16G --repeat 3 --write   # the real run
    python benchmarks/run.py --only local,upload --dense 64M --sparse 256M --repeat 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _util as util  # noqa: E402 - the sibling module, found through the path set above

RESULTS = HERE / "RESULTS.md"
MiB = 1 << 20
#: share of the one-step images' 1 MiB blocks that hold data (the rest are holes)
ONESTEP_DATA_SHARE = 0.5
AREAS = ("local", "decoders", "upload", "download", "chunked", "onestep")

#: header names, in order of preference, of the columns the summary takes
LABEL_COLUMNS = ("image", "drive", "task", "command", "to", "drivepipe run", "reference", "run")
RATIO_COLUMNS = ("ratio", "vs curl -o", "vs direct", "resume vs full run")
OURS_RSS = ("drivepipe RSS", "RSS", "peak RSS")
THEIRS_RSS = ("reference RSS", "curl RSS")
#: what an area's ratio compares against when its rows do not say
IMPLIED_REFERENCE = {"upload": "curl --upload-file", "download": "curl -o",
                     "chunked": "one direct POST"}


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class AreaResult:
    area: str
    argv: list[str]
    output: str = ""
    error: str = ""
    tables: list[Table] = field(default_factory=list)


@dataclass
class SummaryRow:
    area: str
    comparison: str
    ratio: str
    ours_rss: str
    theirs_rss: str

    def cells(self) -> list[str]:
        return [self.area, self.comparison, self.ratio, self.ours_rss, self.theirs_rss]


SUMMARY_HEADERS = ["area", "comparison", "ratio (drivepipe / reference)", "drivepipe RSS",
                   "reference RSS"]


# ---------------------------------------------------------------- the per-area scripts


def script_argv(area: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    """The command line of one area's script, with sizes from our options."""
    rep = ["--repeat", str(args.repeat), "--dir", str(workdir / area)]
    per_area = {
        "local": ["bench_local.py", "--sparse-size", args.sparse, "--dense-size", args.dense],
        "decoders": ["bench_decoders.py", "--size", args.qcow2, "--stream-size", args.stream],
        "upload": ["bench_upload.py", "--sparse-size", args.sparse, "--dense-size", args.dense],
        "download": ["bench_download.py", "--sparse-size", args.sparse,
                     "--dense-size", args.dense],
        "chunked": ["bench_chunked.py", "--size", args.dense, "--chunk-size", args.chunk_size],
    }
    script, *options = per_area[area]
    (workdir / area).mkdir(parents=True, exist_ok=True)  # some scripts make their dir inside
    return [sys.executable, str(HERE / script), *options, *rep]


def run_script(area: str, argv: list[str]) -> AreaResult:
    """Run one script; its progress goes to our stderr, its tables are parsed."""
    print(f"== {area}: {' '.join(Path(a).name if a.endswith('.py') else a for a in argv)}",
          file=sys.stderr, flush=True)
    result = AreaResult(area, argv)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=HERE.parent)
    sys.stderr.write(proc.stderr)
    result.output = proc.stdout
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        result.error = f"exit {proc.returncode}: {tail}"
    result.tables = list(parse_tables(proc.stdout))
    return result


def parse_tables(text: str) -> Iterator[Table]:
    """The markdown tables in ``text``: a header row, a rule, then rows."""
    lines = text.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|[-:| ]+\|$", lines[i + 1].strip()):
            headers = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            yield Table(headers, rows)
        else:
            i += 1


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _pick(row: dict[str, str], names: tuple[str, ...]) -> str:
    return next((row[n] for n in names if row.get(n)), "")


def summary_rows(result: AreaResult) -> list[SummaryRow]:
    """Every row of the area's tables that carries a ratio."""
    if result.error:
        return [SummaryRow(result.area, f"failed: {result.error}", "-", "-", "-")]
    return [row for table in result.tables for row in table_rows(result.area, table)]


def table_rows(area: str, table: Table) -> list[SummaryRow]:
    rows = [dict(zip(table.headers, cells, strict=False)) for cells in table.rows]
    tool_column, reference = per_tool_reference(table)
    theirs_rss: dict[str, str] = {}
    if reference is not None:
        # One row per tool (bench_download, bench_chunked): the reference's own rows
        # are not comparisons; their RSS is the reference RSS of the other rows.
        refs = [r for r in rows if r.get(tool_column, "").startswith(reference)]
        theirs_rss = {r.get("drive", ""): _pick(r, OURS_RSS) for r in refs}
        rows = [r for r in rows if r not in refs]
    out = []
    for row in rows:
        ratio_header = next((h for h in RATIO_COLUMNS if row.get(h)), "")
        ratio = row.get(ratio_header, "")
        if not ratio or ratio in ("-", "n/a"):
            continue
        label = " · ".join(row[c] for c in LABEL_COLUMNS if row.get(c)) or ratio_header
        if area in IMPLIED_REFERENCE and " vs " not in f" {label} ":
            label += f" vs {IMPLIED_REFERENCE[area]}"
        theirs = _pick(row, THEIRS_RSS) or theirs_rss.get(row.get("drive", ""), "")
        out.append(SummaryRow(area, label, ratio, _pick(row, OURS_RSS), theirs))
    return out


def per_tool_reference(table: Table) -> tuple[str, str | None]:
    """(``command``, ``curl -o``) for a table of one row per tool and a ``vs curl -o`` ratio."""
    column = next((c for c in ("command", "run") if c in table.headers), "")
    reference = next((h[3:] for h in table.headers if h.startswith("vs ")), None)
    return column, reference if column else None


# ---------------------------------------------------------------- one-step uploads


def onestep(args: argparse.Namespace, workdir: Path) -> AreaResult:
    """Upload a qcow2 / gzip in one step vs convert-to-raw then curl, to the local store."""
    import bench_upload  # noqa: PLC0415 - a sibling, imported only when this area runs

    work = workdir / "onestep"
    work.mkdir(parents=True, exist_ok=True)
    result = AreaResult("onestep", ["(in run.py)"])
    raw = compressible_image(work / "disk.raw", util.parse_size(args.qcow2))
    inputs = make_onestep_inputs(raw, work)
    password, netrc = bench_upload.throwaway_account(work)
    rows = []
    with bench_upload.running_store(work / "store", password, netrc) as store:
        for label, image, to_raw in inputs:
            rows.append(onestep_row(store, label, image, to_raw, work / "tmp.raw", args.repeat))
        store.delete_drives()
    headers = ["image", "reference", "drivepipe s", "reference s", "ratio", "drivepipe RSS",
               "reference RSS"]
    result.tables = [Table(headers, rows)]
    result.output = ("one-step upload vs convert to raw then curl --upload-file, local store, "
                     f"best of {args.repeat}\n\n" + util.markdown_table(headers, rows) + "\n")
    for path in (raw, *(image for _, image, _ in inputs)):
        util.remove(path)
    return result


def compressible_image(path: Path, size: int, seed: int = 3) -> Path:
    """A sparse raw image, half of it 1 MiB blocks of text-like data (deflate to ~40 %)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(4000)]
    blocks = [(b" ".join(rng.choices(words, k=MiB // 6)) * 2)[:MiB] for _ in range(16)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset in range(0, size - MiB + 1, MiB):
            if rng.random() < ONESTEP_DATA_SHARE:
                os.pwrite(fd, rng.choice(blocks), offset)
    finally:
        os.close(fd)
    return path


def make_onestep_inputs(raw: Path, work: Path) -> list[tuple[str, Path, str]]:
    """(label, image, shell command writing it as raw to $2) for qcow2 zlib and gzip."""
    qcow2 = work / "disk.qcow2"
    subprocess.run([util.tool("qemu-img"), "convert", "-c", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    gz = work / "disk.raw.gz"
    with open(raw, "rb") as src, open(gz, "wb") as dst:
        subprocess.run([util.tool("pigz"), "-6"], stdin=src, stdout=dst, check=True)
    return [
        (f"qcow2 zlib ({util.fmt_size(raw.stat().st_size)} raw)", qcow2,
         'qemu-img convert -O raw "$1" "$2"'),
        (f"gzip ({util.fmt_size(raw.stat().st_size)} raw)", gz, 'gunzip -c "$1" > "$2"'),
    ]


def onestep_row(
    store: object, label: str, image: Path, to_raw: str, tmp: Path, repeat: int
) -> list[str]:
    import bench_upload  # noqa: PLC0415

    util.warm_cache(image)
    ours = bench_upload.timed(store, bench_upload.drivepipe_argv(store, image), repeat)
    curl = " ".join(f"'{a}'" for a in bench_upload.curl_argv(store, tmp))
    two_steps = ["sh", "-c", f'{to_raw} && {curl} > /dev/null', "sh", str(image), str(tmp)]

    def clean() -> None:
        store.delete_drives()  # type: ignore[attr-defined]  # bench_upload.Store
        util.remove(tmp)
        util.settle()

    theirs = util.time_command(two_steps, repeat=repeat, before=clean)
    util.remove(tmp)
    reference = to_raw.split(maxsplit=1)[0] + " to raw + curl --upload-file"
    return [f"upload {label} in one step", reference, f"{ours.best:.2f}", f"{theirs.best:.2f}",
            util.fmt_ratio(ours.best, theirs.best), util.fmt_size(ours.peak_rss),
            util.fmt_size(theirs.peak_rss)]


# ---------------------------------------------------------------- the machine


def version_of(argv: list[str], words: int = 3) -> str:
    """The first ``words`` words of a tool's ``--version`` line."""
    if shutil.which(argv[0]) is None:
        return "not installed"
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    line = ((proc.stdout or proc.stderr).strip().splitlines() or ["?"])[0]
    return " ".join(line.split()[:words])


def meminfo_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return util.fmt_size(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def filesystem(path: Path) -> str:
    proc = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    return lines[-1].split()[1] if len(lines) > 1 else "unknown"


def machine(workdir: Path) -> list[tuple[str, str]]:
    import pycurl  # noqa: PLC0415 - only to report its version

    import drivepipe  # noqa: PLC0415

    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", cpu_model()),
        ("cores", str(os.cpu_count())),
        ("RAM", meminfo_total()),
        ("kernel", platform.release()),
        ("filesystem of the work directory", filesystem(workdir)),
        ("Python", platform.python_version()),
        ("drivepipe", drivepipe.__version__),
        ("pycurl / libcurl", " ".join(pycurl.version.split()[:2])),
        ("curl", version_of(["curl", "--version"], 2)),
        ("qemu-img", version_of(["qemu-img", "--version"])),
        ("xxhsum", version_of(["xxhsum", "--version"], 2)),
    ]


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", default="256M", help="dense images (upload, download, local, "
                   "chunked): 256M")
    p.add_argument("--sparse", default="1G", help="sparse images, 10%% data: 1G")
    p.add_argument("--qcow2", default="256M", help="raw size of the qcow2 images: 256M")
    p.add_argument("--stream", default="128M", help="raw size of the gzip/xz/zstd/bzip2 "
                   "files: 128M")
    p.add_argument("--chunk-size", default="16M", help="chunk size of the chunked runs: 16M")
    p.add_argument("--repeat", type=int, default=2, help="runs per command, best kept: 2")
    p.add_argument("--only", default=",".join(AREAS), help=f"areas, from {','.join(AREAS)}")
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a new "
                   "one under /var/tmp, removed at the end)")
    p.add_argument("--write", action="store_true", help=f"also write {RESULTS.name}")
    p.add_argument("--note", default="", help="a line to put under the title (e.g. why a "
                   "run used small sizes)")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(AREAS)
    if unknown:
        p.error(f"unknown areas {sorted(unknown)}; known: {', '.join(AREAS)}")
    return args


def run_areas(args: argparse.Namespace, workdir: Path) -> list[AreaResult]:
    results = []
    for area in AREAS:
        if area not in args.only.split(","):
            continue
        if area == "onestep":
            try:
                results.append(onestep(args, workdir))
            except (subprocess.CalledProcessError, OSError, SystemExit) as exc:
                results.append(AreaResult(area, [], error=str(exc) or type(exc).__name__))
            continue
        results.append(run_script(area, script_argv(area, args, workdir)))
    return results


def report(results: list[AreaResult], args: argparse.Namespace, workdir: Path,
           command: str) -> str:
    rows = [r.cells() for result in results for r in summary_rows(result)]
    parts = [
        "# Benchmark results", "",
        *([f"**{args.note}**", ""] if args.note else []),
        f"`{command}`", "",
        "Ratio = drivepipe time / reference time: below 1.00x drivepipe is faster. "
        "Peak RSS is the resident memory high-water mark of each process "
        f"(GNU time). Best of {args.repeat} runs, warm page cache.", "",
        "## Summary", "", util.markdown_table(SUMMARY_HEADERS, rows), "",
        "## Machine", "", util.markdown_table(["machine", ""], machine(workdir)), "",
    ]
    for result in results:
        parts += [f"## {result.area}", ""]
        if result.error:
            parts += [f"failed: {result.error}", ""]
        parts += [result.output.strip(), ""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="drivepipe-suite-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--note" in shown:  # the note is printed on its own line
        at = shown.index("--note")
        del shown[at : at + 2]
    command = "python benchmarks/run.py " + " ".join(shown)
    try:
        results = run_areas(args, workdir)
        text = report(results, args, workdir, command.strip())
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    if args.write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
