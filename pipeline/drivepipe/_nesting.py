"""Nested images: decode layer after layer until the raw disk comes out.

``disk.qcow2.xz`` is a qcow2 disk inside xz, not a raw disk: after an outer
compressor the *decoded* bytes are detected by their magic exactly like a plain
file's (never by the file name), up to :data:`~drivepipe._registry.MAX_DEPTH`
layers.  What happens next depends on what is inside:

- a raw disk streams through the compressor's decoder as before, its exact
  size from the compressor's index or headers, else a counting pass;
- a format that reads its input in order (another compressor's stream,
  ``sequential`` formats) still needs its own random reads for sizes and
  indexes, so like every other inner format it gets a random-access view:
- the view is the compressor's own index when it has one (several xz blocks,
  several zstd frames: a block is decoded when a read needs it), else a
  *spool*: the decoded bytes written once into a sparse temporary file (all-zero
  blocks never written), shown as the ``spooling`` phase, removed from its
  directory the moment it is created so that nothing is left behind after
  success, failure, Ctrl-C or even SIGKILL.

The exact raw size is always known before the first byte flows: it is the
innermost format's (qcow2's virtual size), however deep.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

from drivepipe._errors import CorruptImage, ImageError, OutputError, UnsupportedFormat, UsageError
from drivepipe._extent import Extent
from drivepipe._registry import MAX_DEPTH, byte_source, detect_source, get_format
from drivepipe._stage import (
    HEAD_SIZE,
    ByteSource,
    CompressionFormat,
    DecodedLayer,
    ImageFormat,
    ImageInput,
    OpenOptions,
    Source,
    Stage,
    raw_inside,
)

T = TypeVar("T")

#: the tail of a raw disk from a compressor checked for a format's footer (VHD: 512)
TAIL_CHECK = 512
#: a spool write is at most this big (the page cache takes slices better)
_SPOOL_WRITE = 1 << 20


def open_layers(
    source: ByteSource,
    chain: list[str] | None,
    options: OpenOptions,
    depth: int,
    known: ImageFormat | None = None,
) -> ImageInput:
    """Open ``source`` as layer ``depth`` of an image; the result owns ``source``.

    ``known``: the format, when the layer outside already detected it from the
    decoded head (it was announced through ``on_layer`` then)."""
    if depth >= MAX_DEPTH:
        raise UnsupportedFormat(
            f"{source.label}: more than {MAX_DEPTH} nested layers; refusing to look deeper"
        )
    head = source.head(HEAD_SIZE)
    named = chain[depth] if chain and depth < len(chain) else None
    fmt = known or (get_format(named) if named else detect_source(source, head))
    if options.on_layer is not None and known is None:
        options.on_layer(fmt.name)
    if not isinstance(fmt, CompressionFormat):
        return _open_flat(fmt, source, options)
    layer = _guarded(fmt, source, lambda: fmt.open_layer(source, options))
    try:
        return _open_inside(fmt, layer, source, chain, options, depth)
    except BaseException:
        layer.close()
        raise


def _guarded(fmt: ImageFormat, source: ByteSource, call: Callable[[], T]) -> T:
    try:
        return call()
    except (ImageError, UsageError, OutputError):
        raise
    except EOFError as exc:
        raise CorruptImage(f"{source.label}: truncated {fmt.name} image") from exc


def _open_flat(fmt: ImageFormat, source: ByteSource, options: OpenOptions) -> ImageInput:
    return _guarded(fmt, source, lambda: fmt.open(source, options))


def _open_inside(
    fmt: CompressionFormat,
    layer: DecodedLayer,
    source: ByteSource,
    chain: list[str] | None,
    options: OpenOptions,
    depth: int,
) -> ImageInput:
    inner_head = layer.head(HEAD_SIZE)
    label = f"{source.label} (decoded {fmt.name})"
    named = chain[depth + 1] if chain and depth + 1 < len(chain) else None
    inner = get_format(named) if named else detect_source(_HeadOnly(label, inner_head))
    view = None
    tail_checked = False
    if inner.name == "raw" and inner_head and not named:
        # Formats found by a footer (a fixed VHD) look raw from the head: an indexed
        # layer can show its tail now; a streamed one is checked as its end goes by.
        view = layer.random_view(options)
        if view is not None:
            tail_checked = True
            inner = detect_source(_HeadOnly(label, inner_head, view.tail(TAIL_CHECK)))
            if inner.name == "raw":
                view.close()
                view = None
    if options.on_layer is not None:
        options.on_layer(inner.name)
    if inner.name == "raw" or not inner_head:
        image = raw_inside(fmt.name, layer, source, options)
        if not named and inner_head and not tail_checked:
            image.stages.append(TailGuard(label, inner_head, fmt.name))
        return image
    if view is None:
        view = layer.random_view(options)
    spooled: dict[str, object] = {}
    if view is None:
        view = spool(layer, label, options)
        spooled = {"spool_dir": spool_dir(options), "spool_bytes": _allocated(view)}
    try:
        image = open_layers(view, chain, options, depth + 1, inner)
    except BaseException:
        view.close()
        raise
    image.resources[:0] = [source, layer]
    image.chain = [fmt.name, *image.chain]
    # "gzip > xz", as a raw disk inside one compressor is just "gzip"
    shown = image.chain[:-1] if image.chain[-1] == "raw" else image.chain
    image.format = " > ".join(shown)
    image.file_size = source.size
    image.details = {
        # the size is the inner format's, so how the layer would have sized itself is moot
        **{f"{fmt.name}_{k}": v for k, v in layer.details.items() if k != "size_from"},
        **image.details,
        **spooled,
    }
    return image


class TailGuard(Stage):
    """Holds back the last :data:`TAIL_CHECK` bytes of a raw disk streamed out of a
    compressor, and refuses them if they are the footer of a format (a fixed VHD is
    raw data plus a 512-byte footer: sent as raw, the drive would be one sector too
    big and hold the footer).  Failing before the last byte means no drive."""

    name = "tail-check"

    def __init__(self, label: str, head: bytes, outer: str) -> None:
        self.label = label
        self.head = head
        self.outer = outer

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        held: list[Extent] = []
        held_bytes = 0
        for ext in upstream:
            held.append(ext)
            held_bytes += ext.length
            while held and held_bytes - held[0].length >= TAIL_CHECK:
                first = held.pop(0)
                held_bytes -= first.length
                yield first
        tail = _last_bytes(held, TAIL_CHECK)
        found = detect_source(_HeadOnly(self.label, self.head, tail))
        if found.name != "raw":
            raise UnsupportedFormat(
                f"{self.label}: ends in a {found.name} footer, so it is a {found.name} image "
                f"inside {self.outer}, not a raw disk; name the format chain "
                f"{self.outer},{found.name}"
            )
        yield from held


def _last_bytes(extents: list[Extent], count: int) -> bytes:
    """The last ``count`` bytes of ``extents`` (a hole of any length costs nothing)."""
    parts: list[bytes] = []
    need = count
    for ext in reversed(extents):
        if need <= 0:
            break
        take = min(need, ext.length)
        if ext.data is None:
            parts.append(bytes(take))
        else:
            parts.append(bytes(memoryview(ext.data)[ext.length - take :]))
        need -= take
    return b"".join(reversed(parts))


class _HeadOnly(ByteSource):
    """The first bytes of a decoded stream, for detection only (no tail, no reads)."""

    random = False

    def __init__(self, label: str, head: bytes, tail: bytes | None = None) -> None:
        self.label = label
        self._head = head
        self._tail = tail
        self.size = len(head)

    def head(self, length: int = HEAD_SIZE) -> bytes:
        return self._head[:length]

    def tail(self, length: int) -> bytes | None:
        if self._tail is None or len(self._tail) < length:
            return None
        return self._tail[-length:]

    def extents(self) -> Iterator[Extent]:
        raise ImageError(f"{self.label}: cannot be read here")


def _allocated(source: ByteSource) -> int:
    """Bytes the spool file takes on disk (its holes take none)."""
    fd = getattr(source, "fd", -1)
    try:
        return os.fstat(fd).st_blocks * 512 if fd >= 0 else source.size
    except OSError:
        return source.size


def spool_dir(options: OpenOptions) -> str:
    import tempfile  # noqa: PLC0415 - only where a spool is made

    return options.spool_dir or tempfile.gettempdir()


def spool_stream(source: Source, label: str, options: OpenOptions) -> ByteSource:
    """Read a stream (standard input as a pipe) once into an unlinked sparse spool file."""
    return _spool(source, [], None, label, options)


def spool(layer: DecodedLayer, label: str, options: OpenOptions) -> ByteSource:
    """Decode ``layer`` once into an unlinked sparse temporary file; return it as a source."""
    hint = layer.exact_size()
    stream, stages = layer.stream(hint, options)
    return _spool(stream, stages, hint, label, options)


def _spool(
    stream: Source, stages: list[Stage], hint: int | None, label: str, options: OpenOptions
) -> ByteSource:
    import tempfile  # noqa: PLC0415 - see spool_dir

    where = spool_dir(options)
    try:
        fd, path = tempfile.mkstemp(prefix=".drivepipe-spool-", suffix=".raw", dir=where)
    except OSError as exc:
        raise OutputError(
            f"{where}: cannot create a spool file for {label}: {exc.strerror or exc}"
        ) from exc
    try:
        os.unlink(path)
        _write_spool(fd, stream, stages, hint, options, where, label)
        return byte_source("file")(
            label, fd=fd, read_size=options.read_size, label=label
        )
    except BaseException:
        os.close(fd)
        raise


def _write_spool(
    fd: int, stream: Source, stages: list[Stage], hint: int | None, options: OpenOptions,
    where: str, label: str,
) -> int:
    """Write the decoded bytes at their offsets, holes skipped; return the size."""
    extents = stream.extents()
    for stage in stages:
        extents = stage.process(extents)
    total = hint or 0
    end = 0
    on_phase = options.on_phase
    try:
        for ext in extents:
            if ext.data is not None:
                _pwrite_all(fd, ext, where, label, hint)
            end = ext.end
            if on_phase is not None:
                on_phase("spooling", end, max(total, end))
        os.ftruncate(fd, end)
    finally:
        for stage in stages:
            stage.close()
    return end


def _pwrite_all(fd: int, ext: Extent, where: str, label: str, hint: int | None) -> None:
    assert ext.data is not None
    view = memoryview(ext.data)
    pos = 0
    while pos < len(view):
        piece = view[pos : pos + _SPOOL_WRITE]
        try:
            n = os.pwrite(fd, piece, ext.offset + pos)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                need = f"up to {hint} bytes" if hint else "as much as the decoded data"
                raise OutputError(
                    f"{where}: no space left for the spool file of {label}: it needs "
                    f"{need} (the {ext.offset + pos} bytes decoded so far did not fit); "
                    "free space there or choose another spool directory"
                ) from exc
            raise OutputError(
                f"{where}: cannot write the spool file of {label}: {exc.strerror}"
            ) from exc
        pos += n
