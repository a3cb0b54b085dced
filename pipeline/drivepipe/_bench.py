"""Find what limits a transfer: measure each stage alone, then the whole pipeline.

In: a :class:`Subject` - how to open the image (any format) and how to make the
sink that sends it (the local drive store, a real endpoint, or a discard sink) -
and a :class:`Budget` (raw bytes and seconds per measurement).  Out: a
:class:`BenchReport` with, for each stage measured alone, its throughput in raw
image bytes per second; the whole pipeline's throughput; the stage that limits
it; and advice whose gain was measured by re-running with the suggested setting.
Refused: an empty image (nothing to measure), and what opening the image or
sending refuses.

Every rate is in *raw image bytes per second*, holes included, so the stages
compare directly: a reader that skips a 90 % hole image's holes reads "10x
faster" than its disk, while the network, which must carry those zeros, does not.

- **read**: the file's own bytes, read as the sparse reader reads them (holes
  skipped), into nothing; scaled by raw size / file size.  Read twice: the
  first is the one shown (from the disk, if the file was not cached: what an
  upload meets), the second comes from the page cache.
- **decode**: the format's source and decoder stages (qcow2 clusters, gzip
  members ...) producing the raw stream, minus the time the second (warm) read
  took for those bytes - the decode pass reads warm too; absent for raw images.
- **hash**: xxh3-128 over the decoded stream (holes from the zero buffer).
- **send**: the sink alone, fed from memory a replay of the same extents (same
  data and holes, random bytes), so neither the disk nor a decoder is timed.

Each measurement stops at the byte limit or the time budget; the window the
pipeline and the sink see is chosen so they finish in about the budget too.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import zstandard

from drivepipe._errors import ImageError
from drivepipe._extent import Extent
from drivepipe._registry import byte_source, target
from drivepipe._registry import stage as plugin_stage
from drivepipe._runner import metered, run_pipeline
from drivepipe._sizes import format_rate, format_size
from drivepipe._stage import ImageInput, OpenOptions, Sink, Source, Stage
from drivepipe._stats import RunStats, StageStats

MiB = 1 << 20
#: decoded data kept to measure how fast zstd would decode the same bytes
SAMPLE_SIZE = 32 * MiB
#: the first send is this small, to learn how many bytes the budget allows
SEND_PROBE = 32 * MiB
#: rounds of a before/after comparison
AB_ROUNDS = 2
#: sends are timed this many times and the best kept
SEND_REPEAT = 2
#: the whole pipeline is "slower than its slowest stage" below this share of it
OVERLAP_SHORTFALL = 0.75
#: advice is given when the measured gain is at least this much
WORTHWHILE = 0.10
#: a second read this much faster than the first means the first came from the disk
COLD_FACTOR = 2.0
#: ... and the first took at least this long (shorter runs are mostly noise)
COLD_MIN_SECONDS = 0.25
#: opening slower than this (a counting pass) is worth a line of advice
SLOW_OPEN = 1.0
#: read sizes tried when the reader limits
BIGGER_READ_SIZES = (16 * MiB, 64 * MiB)

SinkFactory = Callable[[int], Sink[Any]]


@dataclass(frozen=True)
class Budget:
    """How much to measure: at most ``limit`` raw bytes and ``seconds`` per run."""

    seconds: float = 3.0
    limit: int = 1 << 30


@dataclass
class SendVariant:
    """Another way to send (bigger buffer, more connections) worth measuring.

    Either a sink factory, or - for senders that are not one sink, such as a
    chunked upload over several connections - ``send(source, size)``, which
    sends the source's ``size`` bytes and returns the seconds the sending took.
    """

    advice: str
    make_sink: SinkFactory | None = None
    send: Callable[[Source, int], float] | None = None


@dataclass
class Subject:
    """What to measure: an image (reopened for each run) and where it would go."""

    path: str
    open: Callable[[OpenOptions], ImageInput]
    options: OpenOptions = field(default_factory=OpenOptions)
    #: the sink the image would be sent to; None measures a discard sink
    make_sink: SinkFactory | None = None
    #: shown in the send row: "local store", "https://...", "discard"
    sink_label: str = "discard"
    send_variants: list[SendVariant] = field(default_factory=list)
    queue_depth: int = 16


@dataclass
class Measure:
    """One stage's throughput, in raw image bytes per second."""

    role: str  # read | decode | hash | send | pipeline
    label: str
    raw_bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.raw_bytes / self.seconds if self.seconds > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        rate = self.rate
        return {
            "role": self.role, "label": self.label, "raw_bytes": self.raw_bytes,
            "seconds": round(self.seconds, 6),
            "rate_bps": None if math.isinf(rate) else round(rate, 1),
        }


@dataclass
class Advice:
    """A setting to change, and what it did when tried (rates in raw bytes/s)."""

    text: str
    before: float
    after: float | None = None

    @property
    def worthwhile(self) -> bool:
        """Advice to follow: a fact to know (nothing tried), or a measured gain."""
        gain = self.gain
        return self.after is None or (gain is not None and gain >= WORTHWHILE)

    @property
    def gain(self) -> float | None:
        if self.after is None or self.before <= 0 or math.isinf(self.before):
            return None
        return self.after / self.before - 1

    def as_dict(self) -> dict[str, Any]:
        gain = self.gain
        return {"text": self.text, "before_bps": _finite(self.before),
                "after_bps": _finite(self.after),
                "gain": None if gain is None else round(gain, 3)}


@dataclass
class BenchReport:
    path: str
    format: str
    size: int
    data_share: float | None
    stages: list[Measure]
    pipeline: Measure | None
    bottleneck: Measure
    advice: list[Advice]
    #: seconds opening the image took (a counting pass, for gzip/bzip2 without an index)
    open_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "size": self.size,
            "data_share": self.data_share,
            "stages": [m.as_dict() for m in self.stages],
            "pipeline": self.pipeline.as_dict() if self.pipeline else None,
            "bottleneck": self.bottleneck.role,
            "open_s": round(self.open_seconds, 3),
            "advice": [a.as_dict() for a in self.advice],
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else round(value, 1)


def slowest(measures: Iterable[Measure]) -> Measure:
    """The stage that limits the pipeline: the one with the lowest raw rate."""
    return min(measures, key=lambda m: m.rate)


# ---------------------------------------------------------------- streams


def take(extents: Iterator[Extent], limit: int, deadline: float) -> Iterator[Extent]:
    """The first ``limit`` bytes of a stream, or fewer if ``deadline`` passes first.

    The stream always stops on a whole-extent boundary except at ``limit``, where
    the last extent is cut, so a fixed window is exactly ``limit`` bytes long.
    """
    done = 0
    for ext in extents:
        if done + ext.length >= limit:
            yield _head(ext, limit - done)
            return
        yield ext
        done += ext.length
        if time.perf_counter() >= deadline:
            return


def _head(ext: Extent, n: int) -> Extent:
    if ext.data is None:
        return Extent.hole(ext.offset, n)
    return Extent(ext.offset, n, memoryview(ext.data)[:n])


class Window(Stage):
    """Passes the first ``size`` bytes of the stream and stops (the bench's window)."""

    name = "window"

    def __init__(self, size: int) -> None:
        self.size = size

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        return take(upstream, self.size, math.inf)


@dataclass(frozen=True)
class Piece:
    """One extent of the measured stream, without its bytes."""

    offset: int
    length: int
    hole: bool


class ReplaySource(Source):
    """The recorded extents again, data from one random buffer: costs ~nothing."""

    name = "replay"

    def __init__(self, layout: list[Piece], size: int) -> None:
        self.layout = layout
        self.size = size
        self._pool = os.urandom(4 * MiB)

    def extents(self) -> Iterator[Extent]:
        pool = memoryview(self._pool)
        for piece in self.layout:
            if piece.hole:
                yield Extent.hole(piece.offset, piece.length)
                continue
            for pos in range(0, piece.length, len(pool)):
                n = min(len(pool), piece.length - pos)
                yield Extent(piece.offset + pos, n, pool[:n])


def cut_layout(layout: list[Piece], size: int) -> list[Piece]:
    """The pieces covering ``[0, size)``, the last one shortened."""
    out: list[Piece] = []
    for piece in layout:
        if piece.offset >= size:
            break
        out.append(replace(piece, length=min(piece.length, size - piece.offset)))
    return out


# ---------------------------------------------------------------- measurements


def expansion(image: ImageInput) -> float:
    """Raw bytes per file byte (a 1 GiB qcow2 of a 10 GiB disk: 10)."""
    return image.size / image.file_size if image.file_size > 0 else 1.0


def measure_read(subject: Subject, budget: Budget, read_size: int, scale: float) -> Measure:
    """The file's bytes, as the sparse reader reads them, into nothing.

    ``scale`` turns file bytes into raw bytes (see :func:`expansion`).
    """
    reader = byte_source("file")(subject.path, read_size=read_size)
    file_limit = max(1, int(budget.limit / scale))
    try:
        t0 = time.perf_counter()
        done = sum(e.length for e in take(reader.extents(), file_limit, t0 + budget.seconds))
        seconds = time.perf_counter() - t0
    finally:
        reader.close()
    return Measure("read", f"read ({format_size(read_size)} reads)", int(done * scale), seconds)


@dataclass
class Decoded:
    """What one pass over the decoded stream learned."""

    raw_bytes: int
    decode_inclusive: float  # seconds in source + decoders, read included
    hash_seconds: float
    layout: list[Piece]
    sample: bytes
    data_bytes: int
    format: str
    size: int
    decodes: bool  # False when the source is the file itself (raw)


def measure_decoded(image: ImageInput, budget: Budget) -> Decoded:
    """Source -> decoders -> xxh3 in one thread, each part metered on its own.

    Takes a freshly opened image (nothing pulled yet) and closes it.
    """
    try:
        return _decode_pass(image, budget)
    finally:
        image.close()


def _metered_chain(image: ImageInput, stats: RunStats) -> tuple[Iterator[Extent], StageStats]:
    last = stats.add(image.source.name, "source")
    feed = metered(image.source.extents(), last)
    for stage in image.stages:
        mine = stats.add(stage.name)
        mine.upstream = last
        feed, last = metered(stage.process(feed), mine), mine
    return feed, last


def _decode_pass(image: ImageInput, budget: Budget) -> Decoded:
    stats = RunStats(title="bench")
    feed, last = _metered_chain(image, stats)
    hash_stats = stats.add("xxh3")
    hash_stats.upstream = last
    hashed = metered(plugin_stage("xxh3")().process(take(feed, budget.limit,
                                              time.perf_counter() + budget.seconds)), hash_stats)
    layout: list[Piece] = []
    sample = bytearray()
    data = 0
    for ext in hashed:
        _record(layout, ext)
        if ext.data is not None:
            data += ext.length
            if len(sample) < SAMPLE_SIZE:
                sample += memoryview(ext.data)[: SAMPLE_SIZE - len(sample)]
    raw = sum(p.length for p in layout)
    decodes = bool(image.stages) or not isinstance(image.source, byte_source("file"))  # type: ignore[arg-type]
    return Decoded(raw, last.inclusive, hash_stats.busy, layout, bytes(sample), data,
                   image.format, image.size, decodes)


def _record(layout: list[Piece], ext: Extent) -> None:
    """Append ``ext`` to the layout, merged with the previous piece of the same kind."""
    hole = ext.data is None
    if layout and layout[-1].hole == hole:
        layout[-1] = replace(layout[-1], length=layout[-1].length + ext.length)
    else:
        layout.append(Piece(ext.offset, ext.length, hole))


def decode_measure(decoded: Decoded, read: Measure, label: str) -> Measure:
    """Decoding alone: the decode pass minus the time reading those bytes takes."""
    read_time = decoded.raw_bytes / read.rate if read.rate > 0 else 0.0
    own = max(decoded.decode_inclusive - read_time, decoded.decode_inclusive * 0.01, 1e-9)
    return Measure("decode", label, decoded.raw_bytes, own)


def measure_send(make_sink: SinkFactory, layout: list[Piece], size: int, label: str) -> Measure:
    """The sink alone, fed a replay of ``layout`` cut to ``size`` bytes."""
    stats = RunStats(title="bench send")
    source = ReplaySource(cut_layout(layout, size), size)
    run_pipeline(source, [], make_sink(size), size=size, stats=stats, overlap=False)
    sink = stats.stages[-1]
    return Measure("send", label, size, max(sink.busy, 1e-9))


def send_window(
    make_sink: SinkFactory, decoded: Decoded, budget: Budget, label: str
) -> Measure:
    """Probe a small send (which also warms the receiver up), then time the budget's worth."""
    probe_size = min(decoded.raw_bytes, SEND_PROBE)
    probe = measure_send(make_sink, decoded.layout, probe_size, label)
    affordable = int(probe.rate * budget.seconds) if not math.isinf(probe.rate) else budget.limit
    size = min(decoded.raw_bytes, max(probe_size, affordable))
    return best_send(make_sink, decoded.layout, size, label)


def best_send(make_sink: SinkFactory, layout: list[Piece], size: int, label: str) -> Measure:
    """The faster of two sends: a network shared with other work is noisy."""
    runs = [measure_send(make_sink, layout, size, label) for _ in range(SEND_REPEAT)]
    return max(runs, key=lambda m: m.rate)


def measure_pipeline(
    subject: Subject, make_sink: SinkFactory, size: int, queue_depth: int
) -> Measure:
    """The whole pipeline over the first ``size`` raw bytes, threads overlapping."""
    image = subject.open(subject.options)
    stats = RunStats(title="bench pipeline")
    try:
        stages = [*image.stages, Window(size), plugin_stage("xxh3")()]
        run_pipeline(image.source, stages, make_sink(size), size=size, stats=stats,
                     queue_depth=queue_depth)
    finally:
        image.close()
    label = f"whole pipeline (queue depth {queue_depth})"
    return Measure("pipeline", label, size, max(stats.transfer_elapsed, 1e-9))


# ---------------------------------------------------------------- advice


def a_b(before: Callable[[], float], after: Callable[[], float]) -> tuple[float, float]:
    """Best rate of each of two settings, measured in turns (A B A B), so that a
    machine getting busier or a cache getting warmer favours neither."""
    a = b = 0.0
    for _ in range(AB_ROUNDS):
        a = max(a, before())
        b = max(b, after())
    return a, b


def _read_rate(
    subject: Subject, budget: Budget, read_size: int, scale: float
) -> Callable[[], float]:
    return lambda: measure_read(subject, budget, read_size, scale).rate


def advise_read(subject: Subject, budget: Budget, read: Measure, scale: float) -> list[Advice]:
    """Re-read with bigger reads, each against the current size in turns."""
    out: list[Advice] = []
    current = subject.options.read_size
    for size in BIGGER_READ_SIZES:
        if size <= current:
            continue
        before, after = a_b(_read_rate(subject, budget, current, scale),
                            _read_rate(subject, budget, size, scale))
        out.append(Advice(f"--read-size {size // MiB}M", before, after))
    out.sort(key=lambda a: -(a.gain or 0.0))
    if not any(a.worthwhile for a in out):
        out.append(Advice("bigger reads do not help: the disk is the limit (a faster disk, or "
                          "the image on local storage rather than a network filesystem)",
                          read.rate))
    return out


def zstd_rate(sample: bytes, data_bytes: int, hole_bytes: int) -> float | None:
    """Raw bytes/s zstd would decode: the sample's data, and zeros for the holes."""
    if not sample:
        return None
    data_seconds = _zstd_decode_seconds(sample)
    zero_seconds = _zstd_decode_seconds(bytes(min(len(sample), 8 * MiB)))
    seconds = (data_bytes * data_seconds / len(sample)
               + hole_bytes * zero_seconds / min(len(sample), 8 * MiB))
    return (data_bytes + hole_bytes) / seconds if seconds > 0 else None


def _zstd_decode_seconds(data: bytes) -> float:
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    dctx = zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    dctx.decompress(frame)
    return time.perf_counter() - t0


def advise_decode(
    subject: Subject, budget: Budget, decoded: Decoded, decode: Measure, read: Measure,
    reopen: bool = True,
) -> list[Advice]:
    out: list[Advice] = []
    more = max(subject.options.threads * 2, os.cpu_count() or 1)

    def decode_rate(threads: int) -> float:
        image = subject.open(replace(subject.options, threads=threads))
        return decode_measure(measure_decoded(image, budget), read, decode.label).rate

    if reopen and more > subject.options.threads:
        before, after = a_b(lambda: decode_rate(subject.options.threads),
                            lambda: decode_rate(more))
        out.append(Advice(f"--threads {more} (decoder threads, for formats that decode "
                          "in parallel such as compressed qcow2)", before, after))
    if decoded.format != "zstd":
        holes = decoded.raw_bytes - decoded.data_bytes
        projected = zstd_rate(decoded.sample, decoded.data_bytes, holes)
        if projected is not None and projected > decode.rate * (1 + WORTHWHILE):
            out.append(Advice(
                f"recompress the image with zstd (zstd -T0 on the raw image; measured on "
                f"{format_size(len(decoded.sample))} of its data)", decode.rate, projected))
    if not any(a.worthwhile for a in out):
        out.append(Advice(f"the {decoded.format} decoder is the limit and nothing tried made it "
                          "faster: convert once (drivepipe convert) and send the raw image",
                          decode.rate))
    return out


def _send_rate(make_sink: SinkFactory, decoded: Decoded, send: Measure) -> Callable[[], float]:
    return lambda: measure_send(make_sink, decoded.layout, send.raw_bytes, send.label).rate


def _variant_rate(variant: SendVariant, decoded: Decoded, send: Measure) -> Callable[[], float]:
    if variant.make_sink is not None:
        return _send_rate(variant.make_sink, decoded, send)
    sender = variant.send
    assert sender is not None, "a SendVariant needs make_sink or send"
    size = send.raw_bytes

    def rate() -> float:
        seconds = sender(ReplaySource(cut_layout(decoded.layout, size), size), size)
        return size / max(seconds, 1e-9)

    return rate


def advise_send(
    subject: Subject, decoded: Decoded, send: Measure, measured: list[Measure]
) -> list[Advice]:
    out: list[Advice] = []
    current = subject.make_sink or (lambda _size: target("discard")())
    for variant in subject.send_variants:
        before, after = a_b(_send_rate(current, decoded, send),
                            _variant_rate(variant, decoded, send))
        out.append(Advice(variant.advice, before, after))
    out.sort(key=lambda a: -(a.gain or 0.0))
    holes = 1 - decoded.data_bytes / decoded.raw_bytes if decoded.raw_bytes else 0.0
    if holes > 0.5:
        others = min((m.rate for m in measured if m.role != "send"), default=math.inf)
        out.append(Advice(
            f"{100 * holes:.0f}% of this image is zeros the upload must carry; reading it "
            f"goes at {format_rate(others)}, so the link and the server behind it decide the "
            "time", send.rate))
    return out


def advise_queue(
    subject: Subject, make_sink: SinkFactory, size: int, pipeline: Measure, neck: Measure
) -> list[Advice]:
    if pipeline.rate >= neck.rate * OVERLAP_SHORTFALL:
        return []
    deeper = subject.queue_depth * 4
    before, after = a_b(
        lambda: measure_pipeline(subject, make_sink, size, subject.queue_depth).rate,
        lambda: measure_pipeline(subject, make_sink, size, deeper).rate)
    return [Advice(f"--queue-depth {deeper} (the pipeline ran at "
                   f"{100 * pipeline.rate / neck.rate:.0f}% of its slowest stage)",
                   before, after)]


# ---------------------------------------------------------------- the whole bench


def run_bench(
    subject: Subject, budget: Budget, log: Callable[[str], None] | None = None
) -> BenchReport:
    """Measure read, decode, hash, send alone, then the pipeline; name the slowest."""
    say = log or (lambda _msg: None)
    say("opening the image")
    t0 = time.perf_counter()
    image = subject.open(subject.options)  # opened once here: a counting pass costs a decode
    opened = time.perf_counter() - t0
    if image.size == 0:
        image.close()
        raise ImageError(f"{subject.path}: the image is empty; there is nothing to measure")
    run = _measure_alone(subject, budget, image, say)
    say("whole pipeline")
    pipeline = measure_pipeline(subject, run.make_sink, run.send.raw_bytes, subject.queue_depth)
    neck = slowest(run.stages)
    say(f"trying settings for {neck.role}")
    # Settings that need the image reopened are not tried when opening is a counting pass.
    reopen = opened < budget.seconds / 2
    advice = _advice_for(subject, budget, run, neck, reopen)
    if reopen:
        advice += advise_queue(subject, run.make_sink, run.send.raw_bytes, pipeline, neck)
    if opened >= SLOW_OPEN:
        advice.insert(0, Advice(
            f"opening took {opened:.1f}s before the first byte could flow: the {image.format} "
            "file's raw size is found by decoding it all; a gzip made by bgzip (BGZF) or a zstd "
            "file with content sizes in its frames is sized at once", neck.rate))
    decoded = run.decoded
    share = decoded.data_bytes / decoded.raw_bytes if decoded.raw_bytes else None
    return BenchReport(subject.path, decoded.format, decoded.size, share, run.stages, pipeline,
                       neck, advice, opened)


@dataclass
class _Alone:
    """The stages measured alone, and what the advice needs of them."""

    stages: list[Measure]
    decoded: Decoded
    read: Measure
    decode: Measure | None
    send: Measure
    scale: float
    make_sink: SinkFactory
    #: a second read from the page cache, when it was much faster than the first
    warm_read: Measure | None = None


def _measure_alone(
    subject: Subject, budget: Budget, image: ImageInput, say: Callable[[str], None]
) -> _Alone:
    scale = expansion(image)
    say("read alone")
    try:
        read = measure_read(subject, budget, subject.options.read_size, scale)
        # Again, now from the page cache if it holds the file: the decode pass that
        # follows reads warm too, so its read time is estimated from this one.
        warm = measure_read(subject, budget, subject.options.read_size, scale)
    except BaseException:
        image.close()
        raise
    cold = warm.rate > read.rate * COLD_FACTOR and read.seconds >= COLD_MIN_SECONDS
    if cold:
        read.label = read.label[:-1] + ", cold cache)"
    say("decode and hash alone")
    decoded = measure_decoded(image, budget)
    stages = [read]
    decode = None
    if decoded.decodes:
        decode = decode_measure(decoded, warm, f"decode ({decoded.format})")
        stages.append(decode)
    stages.append(Measure("hash", "hash (xxh3-128)", decoded.raw_bytes,
                          max(decoded.hash_seconds, 1e-9)))
    make_sink = subject.make_sink or (lambda _size: target("discard")())
    say(f"send alone ({subject.sink_label})")
    send = send_window(make_sink, decoded, budget, f"send ({subject.sink_label})")
    stages.append(send)
    return _Alone(stages, decoded, read, decode, send, scale, make_sink, warm if cold else None)


def _advice_for(
    subject: Subject, budget: Budget, run: _Alone, neck: Measure, reopen: bool
) -> list[Advice]:
    if neck.role == "read" and run.warm_read is not None:
        return [Advice("the disk is the limit: a second read, from the page cache, went "
                       "faster; faster storage (or a local copy of the image) gains that",
                       run.read.rate, run.warm_read.rate),
                *advise_read(subject, budget, run.read, run.scale)]
    if neck.role == "read":
        return advise_read(subject, budget, run.read, run.scale)
    if neck.role == "decode" and run.decode is not None:
        return advise_decode(subject, budget, run.decoded, run.decode, run.read, reopen)
    if neck.role == "send":
        return advise_send(subject, run.decoded, run.send, run.stages)
    return [Advice("hashing (xxh3-128) is the limit: it runs at memory speed, so the machine "
                   "is busy elsewhere; nothing to tune in drivepipe", neck.rate)]


def report_lines(report: BenchReport) -> list[str]:
    """The report as text for stdout."""
    share = "" if report.data_share is None else f", {100 * report.data_share:.0f}% data"
    lines = [f"{report.path}: {report.format}, {format_size(report.size)} raw{share}, "
             f"opened in {report.open_seconds:.2f}s", ""]
    rows = [*report.stages, *([report.pipeline] if report.pipeline else [])]
    width = max(len(m.label) for m in rows)
    for m in rows:
        mark = "  <- limits the throughput" if m is report.bottleneck else ""
        rate = "unbounded" if math.isinf(m.rate) else format_rate(m.rate)
        lines.append(f"  {m.label:<{width}}  {rate:>12}  {format_size(m.raw_bytes):>10} in "
                     f"{m.seconds:6.2f}s{mark}")
    lines += ["", f"bottleneck: {report.bottleneck.label} at "
              f"{format_rate(report.bottleneck.rate)}"]
    for a in sorted(report.advice, key=lambda a: not a.worthwhile):
        lead = "advice" if a.worthwhile else "tried, no clear gain"
        lines.append(f"{lead}: {a.text}" + _gain_text(a))
    return lines


def _gain_text(advice: Advice) -> str:
    if advice.after is None:
        return ""
    gain = advice.gain
    pct = f" ({100 * gain:+.0f}%)" if gain is not None else ""
    return f": {format_rate(advice.before)} -> {format_rate(advice.after)}{pct}"
