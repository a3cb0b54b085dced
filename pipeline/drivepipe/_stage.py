"""The contracts every pluggable part implements.

A pipeline is ``Source -> Stage* -> Sink``, pulled from the sink's end:

- a :class:`Source` yields :class:`~drivepipe.Extent` objects in image order,
  holes explicit, and knows how many bytes it will produce before the first
  one flows (``size``);
- a :class:`Stage` is a pull transform: ``process(upstream)`` returns an
  iterator of extents (a decoder turns file bytes into raw image bytes, a hash
  stage passes extents through unchanged while digesting them);
- a :class:`Sink` consumes the stream and returns a result (a drive UUID, a
  file path).  If anything fails, the runner calls ``abort()`` and the sink
  must leave nothing half-done behind (no file under the final name, no drive).

An :class:`ImageFormat` is the plugin that turns bytes into those parts: it
reads a :class:`ByteSource` (a file, a block device, or the decoded output of
an outer compressor - never a path), recognises its magic bytes, finds the
exact raw size by the cheapest exact method, and returns an
:class:`ImageInput` (a source plus decoder stages).  A
:class:`CompressionFormat` (gzip, xz, zstd, bzip2) instead opens a
:class:`DecodedLayer` first, so that the registry can look at what the
decoded bytes are (``disk.qcow2.xz`` is a qcow2 disk) before it decides how
to read them: streamed when they are raw, through the layer's random-access
view (xz blocks, zstd frames) or a sparse spool file when an inner format needs
random reads.  Formats are found through the ``drivepipe.formats`` entry-point
group, byte sources through ``drivepipe.sources``.

Buffer rule: a data extent's buffer belongs to whoever yielded it until the
consumer pulls the next extent; the built-in producers never reuse a buffer
after that, so a consumer may keep one (a window, a queue) as long as it likes.
A producer that wants to reuse buffers must say so in its docstring and must not
be put in front of a consumer that keeps them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from drivepipe._errors import CorruptImage, ImageError, UsageError
from drivepipe._extent import Extent, split_zeros
from drivepipe._stats import StageStats

if TYPE_CHECKING:  # pycurl stays unloaded for local files
    from drivepipe.cloudsigma.config import Credentials, Endpoint
    from drivepipe.transport.curl import TlsOptions

T = TypeVar("T")

#: progress callback for work done before streaming (a counting pass):
#: ``(phase_name, bytes_done, bytes_total)``
PhaseCallback = Callable[[str, int, int], None]


class Source(ABC):
    """Produces the extents of a byte stream in order; ``size`` is exact."""

    name: str = "source"
    size: int = 0

    @abstractmethod
    def extents(self) -> Iterator[Extent]:
        """Yield extents covering ``[0, size)`` in order, each once."""

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold one fd
        """Release what the source holds; called once, even after errors."""


class Stage(ABC):
    """A pull transform over a stream of extents."""

    name: str = "stage"

    @abstractmethod
    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        """Return the transformed stream; must pull ``upstream`` lazily."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once, even after errors."""


@dataclass
class TargetOptions:
    """What every target named as an output honours."""

    #: replace an existing output
    force: bool = False
    #: return only when the output is durable (fsync)
    sync: bool = True
    #: write a synced file's data with O_DIRECT where its file system takes it
    #: (drivepipe._direct: durable writes without the page cache)
    direct: bool = False


class Sink(ABC, Generic[T]):
    """Consumes a whole stream of ``size`` bytes and returns a result."""

    name: str = "sink"

    @abstractmethod
    def consume(self, extents: Iterator[Extent], size: int) -> T:
        """Take every extent; return only when the result is durable."""

    def meter(self, stats: StageStats) -> bool:
        """Offer the sink its counters; True if it counts bytes itself as they really
        leave (a sender counts what it hands to the socket, so a 1 TiB hole is not
        "sent" the moment it is queued).  By default the runner counts each extent
        as the sink takes it."""
        return False

    def abort(self) -> None:
        """Undo partial work after a failure (remove temp files, cancel uploads)."""

    @classmethod
    def open_target(cls, spec: str, options: TargetOptions) -> Sink[Any]:
        """Build this target from what follows ``NAME:`` in an output (``file:out.raw``).

        A target registered in the ``drivepipe.targets`` group that can be named as
        an output overrides this; the others (a drive upload needs a client) are
        built by the jobs that use them."""
        raise UsageError(f"the {cls.__name__} target cannot be named as an output")

    def close(self) -> None:
        """Release resources; called once after consume or abort."""


#: bytes read for format detection
HEAD_SIZE = 4096


class ByteSource(Source):
    """Bytes of an exact ``size`` that a format reads; also a Source of their extents.

    A *random* source (a file, a block device, an indexed xz or zstd layer, a
    spool file) answers :meth:`pread` at any offset; a *sequential* one (a pipe,
    a stream decoder) only streams from the start through :meth:`extents` and
    answers :meth:`head` from what it has buffered.  ``label`` is what error
    lines call the bytes: a path, or ``disk.qcow2.xz (decoded xz)``.

    Whoever opens a format on a source hands it over: the returned
    :class:`ImageInput` closes it (``resources``); if ``open`` raises, the
    caller closes it.
    """

    name = "read"
    label: str = ""
    random: bool = True

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer only past ``size``); random sources only."""
        raise ImageError(f"{self.label}: cannot be read out of order (it is a stream)")

    def head(self, length: int = HEAD_SIZE) -> bytes:
        """The first ``min(length, size)`` bytes, for format detection."""
        return self.pread(0, min(length, self.size))

    def tail(self, length: int) -> bytes | None:
        """The last ``length`` bytes (footers); None for sequential sources."""
        if not self.random or self.size < length:
            return None
        return self.pread(self.size - length, length)

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        """Exactly ``length`` bytes at ``offset`` or CorruptImage naming ``what``."""
        data = self.pread(offset, length) if offset >= 0 else b""
        if len(data) != length:
            raise CorruptImage(
                f"{self.label}: truncated: {what} at offset {offset} runs past the end "
                f"({self.size} bytes)"
            )
        return data

    def data_ranges(self, offset: int, end: int) -> Iterator[tuple[int, int]] | None:
        """Ranges of ``[offset, end)`` that hold data, or None when that is unknown
        (then every byte must be read; holes in it are found by looking at zeros)."""
        return None

    def read_range(self, offset: int, length: int) -> Iterator[Extent]:
        """Extents of ``[offset, offset+length)``, holes explicit; random sources only."""
        end = min(offset + length, self.size)
        step = 4 << 20
        pos = offset
        ranges = self.data_ranges(offset, end)
        for lo, hi in ranges if ranges is not None else [(offset, end)]:
            if lo > pos:
                yield Extent.hole(pos, lo - pos)
            at = lo
            while at < hi:
                n = min(step - at % step, hi - at)
                data = self.pread_exact(at, n, "data")
                yield from split_zeros(Extent(at, n, data))
                at += n
            pos = max(pos, hi)
        if pos < end:
            yield Extent.hole(pos, end - pos)

    def extents(self) -> Iterator[Extent]:
        return self.read_range(0, self.size)


class Closeable(Protocol):
    def close(self) -> None: ...


class RandomAccess(Protocol):
    """Implemented by inputs that can produce any range of the raw image."""

    def read_range(self, offset: int, length: int) -> Iterator[Extent]:
        """Yield the raw image's extents covering ``[offset, offset+length)``."""
        ...


@dataclass
class OpenOptions:
    """Knobs a format may honour when opening an image."""

    read_size: int = 4 << 20
    threads: int = 2
    #: read regular files through read-only mmap windows (False: pread; see the file source)
    mmap_reads: bool = True
    #: called during work that happens before streaming (counting passes)
    on_phase: PhaseCallback | None = None
    #: drop pages behind the read cursor for files larger than this (None: auto)
    drop_cache_above: int | None = None
    #: where decoded layers that an inner format must read out of order are spooled
    #: (None: the system temp directory)
    spool_dir: str | None = None
    #: which disk of an image that holds several (an OVA): its id, file name or
    #: 1-based number; None: the only one (several are refused, listed)
    disk: str | None = None
    #: called with each layer's format name as it is detected, outside in, before
    #: that layer does any long work (a counting pass, a spool)
    on_layer: Callable[[str], None] | None = None
    #: the exact size of a raw stream that cannot tell it (a pipe): read as it comes,
    #: and a stream that ends short or runs long fails (None: learn it, e.g. spool)
    size: int | None = None
    #: how http(s) images are fetched (None: the default policy), and the endpoint whose
    #: credentials go to URLs on its origin, and only there (None: anonymous)
    tls: TlsOptions | None = None
    endpoint: Endpoint | None = None
    creds: Credentials | None = None
    #: hears of what a source works around (a remote read retried after a break)
    notify: Callable[[str], None] | None = None


@dataclass
class ImageInput:
    """An opened image: where its raw bytes come from and how big it is."""

    path: str
    format: str
    #: exact size of the raw image, known before streaming
    size: int
    source: Source
    #: decoders that turn the source's bytes into raw image bytes
    stages: list[Stage] = field(default_factory=list)
    #: raw bytes that are data (not holes), when cheap to know
    data_size: int | None = None
    #: size of the file on disk
    file_size: int = 0
    #: set for inputs that can produce any range out of order (raw, qcow2)
    random_access: RandomAccess | None = None
    #: facts worth showing in ``inspect`` (cluster size, compression, ...)
    details: dict[str, object] = field(default_factory=dict)
    #: the formats from the outside in (``["xz", "qcow2"]``); ``[format]`` when flat
    chain: list[str] = field(default_factory=list)
    #: what else to close, after the source and stages (byte sources, layers, spools);
    #: closed last first
    resources: list[Closeable] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.chain:
            self.chain = [self.format]

    def close(self) -> None:
        try:
            for stage in self.stages:
                stage.close()
            self.source.close()
        finally:
            resources, self.resources = self.resources, []
            for res in reversed(resources):
                if res is not self.source:
                    res.close()


class ImageFormat(ABC):
    """A plugin that recognises and opens one image format."""

    name: ClassVar[str]
    #: lower runs first in detection; raw is the fallback and runs last
    detect_order: ClassVar[int] = 50
    #: True when the format reads its input in order only (raw, compressors,
    #: streamOptimized VMDK): inside a compressor it streams, no spool needed
    sequential: ClassVar[bool] = False

    @abstractmethod
    def detect(self, head: bytes, source: ByteSource) -> bool:
        """True if ``head`` (the first 4 KiB or less of ``source``) starts this format.

        ``source`` is there for formats recognised by a footer (``source.tail``);
        reading more than that in ``detect`` is not allowed."""

    @abstractmethod
    def open(self, source: ByteSource, options: OpenOptions) -> ImageInput:
        """Open the image in ``source``; raise ImageError subclasses for anything refused.

        The returned input owns ``source`` (put it in ``resources`` or use it as
        the input's source); when ``open`` raises, the caller closes it."""


class DecodedLayer(ABC):
    """A compressor opened on its bytes, before anyone knows what it holds."""

    #: the compression format's name
    format: str = ""
    details: dict[str, object]

    @abstractmethod
    def head(self, length: int = HEAD_SIZE) -> bytes:
        """The first ``length`` decoded bytes (fewer when the output is shorter)."""

    @abstractmethod
    def exact_size(self) -> int | None:
        """The decoded size when it is known without decoding (an index, headers)."""

    @abstractmethod
    def counted_size(self, options: OpenOptions) -> int:
        """The decoded size by decoding everything once (the "counting" phase)."""

    def random_view(self, options: OpenOptions) -> ByteSource | None:
        """The decoded bytes as a random-access source when the compressed file is
        indexed (several xz blocks, several zstd frames); None otherwise."""
        return None

    @abstractmethod
    def stream(self, size: int | None, options: OpenOptions) -> tuple[Source, list[Stage]]:
        """The decoded bytes as a Source and stages that produce exactly ``size`` bytes
        (any number when ``size`` is None: the spool learns the size by decoding).

        The returned source may be the layer's input itself; closing it is the
        caller's business (through :class:`ImageInput`)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the layer holds beyond its input (which its opener closes)."""


class CompressionFormat(ImageFormat):
    """A stream compressor (gzip, xz, zstd, bzip2): opens a :class:`DecodedLayer`.

    ``open`` is the case of a raw disk inside: the decoded bytes streamed with
    their exact size.  The registry calls ``open_layer`` itself to look inside.
    """

    sequential: ClassVar[bool] = True

    @abstractmethod
    def open_layer(self, source: ByteSource, options: OpenOptions) -> DecodedLayer:
        """Check the compressed structure (indexes, headers) and return the layer."""

    def open(self, source: ByteSource, options: OpenOptions) -> ImageInput:
        layer = self.open_layer(source, options)
        try:
            return raw_inside(self.name, layer, source, options)
        except BaseException:
            layer.close()
            raise


def raw_inside(
    fmt: str, layer: DecodedLayer, source: ByteSource, options: OpenOptions
) -> ImageInput:
    """A raw disk inside ``layer``: its exact size (index, headers, else a counting
    pass), streamed through the layer's decoder; the input owns ``source`` and ``layer``."""
    size = layer.exact_size()
    if size is None:
        size = layer.counted_size(options)
    stream, stages = layer.stream(size, options)
    return ImageInput(
        path=source.label, format=fmt, size=size, source=stream, stages=stages,
        file_size=source.size, details=dict(layer.details), chain=[fmt, "raw"],
        resources=[source, layer],
    )
