"""Finds plugins through entry points and picks the format of an image.

Four kinds of plugin, one entry-point group each: formats (``drivepipe.formats``),
stages (``drivepipe.stages``), byte sources (``drivepipe.sources``) and targets
(``drivepipe.targets``).  drivepipe's own plugins are declared there by its
``pyproject.toml`` like anybody else's, and the engine reaches them only through
this module: no engine module imports ``drivepipe_plugins``.  Detection reads the
first 4 KiB and asks each format in ``detect_order``; never the file name.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from functools import cache
from typing import Any

from drivepipe._entry_points import EntryPoint, declared
from drivepipe._errors import ImageError, SizeMismatch, UnsupportedFormat, UsageError
from drivepipe._stage import (
    HEAD_SIZE,
    ByteSource,
    ImageFormat,
    ImageInput,
    OpenOptions,
    Sink,
    Source,
    Stage,
    TargetOptions,
)

FORMATS_GROUP = "drivepipe.formats"
STAGES_GROUP = "drivepipe.stages"
SOURCES_GROUP = "drivepipe.sources"
TARGETS_GROUP = "drivepipe.targets"
#: the path that means standard input (and, as an output, standard output)
STDIN = "-"
STDIN_LABEL = "standard input"
#: layers of a nested image at most (gzip of xz of qcow2 is three)
MAX_DEPTH = 4

#: formats we recognise but do not decode: refused rather than sent as raw
FOREIGN_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QFI\xfb", "qcow"),  # only reached when the qcow2 plugin refused the version
    (0, b"QED\x00", "QED"),
)


@cache
def _declared() -> dict[str, list[EntryPoint]]:
    """drivepipe's four entry-point groups from one scan of the installed packages (each
    scan reads every package's metadata: one, not four, at every start)."""
    return declared((FORMATS_GROUP, STAGES_GROUP, SOURCES_GROUP, TARGETS_GROUP))


def _group(name: str) -> list[EntryPoint]:
    return _declared().get(name, [])


@cache
def formats() -> dict[str, ImageFormat]:
    """Every installed format, by name, in detection order."""
    found: list[ImageFormat] = []
    for ep in _group(FORMATS_GROUP):
        cls = ep.load()
        fmt = cls()
        if not isinstance(fmt, ImageFormat):
            raise TypeError(f"entry point {ep.name!r} is not an ImageFormat")
        found.append(fmt)
    found.sort(key=lambda f: (f.detect_order, f.name))
    return {f.name: f for f in found}


@cache
def stages() -> dict[str, type[Stage]]:
    """Every installed stage class, by entry-point name."""
    return {ep.name: ep.load() for ep in _group(STAGES_GROUP)}


@cache
def byte_sources() -> dict[str, Callable[..., ByteSource]]:
    """Every installed byte source factory, by entry-point name (``file``, ...)."""
    return {ep.name: ep.load() for ep in _group(SOURCES_GROUP)}


@cache
def targets() -> dict[str, type[Sink[Any]]]:
    """Every installed target (a :class:`Sink` class), by entry-point name."""
    found: dict[str, type[Sink[Any]]] = {}
    for ep in _group(TARGETS_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Sink)):
            raise TypeError(f"entry point {ep.name!r} is not a Sink class")
        found[ep.name] = cls
    return found


@cache
def _load(group: str, name: str) -> Any:
    """The one entry point ``name`` of ``group``, loaded alone: a command that needs the
    ``file`` source does not import the network sources (nor pycurl) for it."""
    for ep in _group(group):
        if ep.name == name:
            return ep.load()
    known = ", ".join(sorted(ep.name for ep in _group(group))) or "none"
    kind = group.rpartition(".")[2].rstrip("s")
    raise UsageError(f"no {kind} named {name!r} is installed (known: {known})")


def target(name: str) -> type[Sink[Any]]:
    """The target class registered as ``name`` (``file``, ``drive``, ``stdout``, ...)."""
    cls = _load(TARGETS_GROUP, name)
    if not (isinstance(cls, type) and issubclass(cls, Sink)):
        raise TypeError(f"entry point {name!r} is not a Sink class")
    return cls


def target_names() -> list[str]:
    """The names of the installed targets (nothing is loaded to list them)."""
    return [ep.name for ep in _group(TARGETS_GROUP)]


def stage(name: str) -> type[Stage]:
    """The stage class registered as ``name`` (``xxh3``, ...)."""
    return _load(STAGES_GROUP, name)  # type: ignore[no-any-return]


def byte_source(name: str) -> Callable[..., ByteSource]:
    """The byte source factory registered as ``name`` (``file``, ``pipe``, ...)."""
    return _load(SOURCES_GROUP, name)  # type: ignore[no-any-return]


def source(name: str) -> Callable[..., Source]:
    """The source factory registered as ``name`` in ``drivepipe.sources``, byte source or
    plain :class:`Source` (``download``: a URL's bytes in order, which formats cannot
    read at random)."""
    return _load(SOURCES_GROUP, name)  # type: ignore[no-any-return]


def open_target(spec: str, options: TargetOptions | None = None) -> tuple[Sink[Any], str]:
    """The target an output names, and the name of its kind.

    ``-`` is standard output (``stdout``); ``NAME:ARG`` is the installed target
    ``NAME`` built from ``ARG`` (``file:out.raw``, a plugin's ``zrle:out.zrle``); a
    block device is the ``device`` target when one is installed; any other path is
    a sparse ``file``.  ``./NAME:x`` is always a file.
    """
    opts = options or TargetOptions()
    kind, arg = "file", spec
    name, sep, rest = spec.partition(":")
    if spec == STDIN:
        kind, arg = "stdout", spec
    elif sep and name in target_names():
        kind, arg = name, rest
    elif "device" in target_names() and _is_block_device(spec):
        kind = "device"
    return target(kind).open_target(arg, opts), kind


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def open_file(path: str, options: OpenOptions | None = None) -> ByteSource:
    """The ``file`` byte source of ``path`` (a regular file or a block device)."""
    opts = options or OpenOptions()
    cls = byte_source("file")
    return cls(path, read_size=opts.read_size, drop_cache_above=opts.drop_cache_above,
               mmap_reads=opts.mmap_reads)


def is_url(path: str) -> bool:
    """True when ``path`` names an http(s) URL rather than a file."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.lower() in ("http", "https")


def shown(path: str) -> str:
    """How an image path is shown (titles, names): a URL without its query string,
    where signed links carry their signature."""
    if not is_url(path):
        return path
    from drivepipe.transport.curl import safe_url  # noqa: PLC0415 - pycurl only for URLs

    return safe_url(path)


def open_stdin(options: OpenOptions, chain: list[str] | None = None) -> ByteSource:
    """Standard input as a byte source: read in place when it is a file or a device
    (``< disk.img``); a pipe of a known size (``options.size``) streams as is when it
    holds a raw disk; any other pipe is read once into a sparse spool file, since every
    format needs its exact size, and most need random reads, before the first byte
    is sent."""
    from drivepipe._nesting import spool_stream  # noqa: PLC0415 - _nesting imports this module

    fd = os.dup(0)
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise ImageError(f"standard input: {exc.strerror}") from exc
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        source: ByteSource = byte_source("file")(
            STDIN_LABEL, fd=fd, read_size=options.read_size, label=STDIN_LABEL,
            mmap_reads=options.mmap_reads)
        if options.size is not None and source.size != options.size:
            got = source.size
            source.close()
            raise SizeMismatch(f"{STDIN_LABEL}: holds {got} bytes, but {options.size} "
                               "were announced")
        return source
    pipe = byte_source("pipe")(fd, STDIN_LABEL, options.read_size)
    if options.size is None:
        try:
            return spool_stream(pipe, STDIN_LABEL, options)
        finally:
            pipe.close()
    return _stream_or_spool(byte_source("sized")(pipe, options.size, STDIN_LABEL),
                            options, chain, once=True)


def open_url(url: str, options: OpenOptions, chain: list[str] | None = None) -> ByteSource:
    """An http(s) URL as a byte source (the ``url`` source): random reads through
    ranges when the server answers them; else a stream, spooled when its outer format
    needs random reads (or, without a known size, as a pipe is)."""
    from drivepipe._nesting import spool_stream  # noqa: PLC0415 - _nesting imports this module

    source = byte_source("url")(url, tls=options.tls, endpoint=options.endpoint,
                                   creds=options.creds, read_size=options.read_size,
                                   notify=options.notify)
    if source.random:
        return source
    if getattr(source, "size_known", True):
        if options.size is not None and source.size != options.size:
            got = source.size
            source.close()
            raise SizeMismatch(f"{source.label}: holds {got} bytes, but {options.size} "
                               "were announced")
        return _stream_or_spool(source, options, chain, once=False)
    if options.size is not None:
        sized = byte_source("sized")(source, options.size, source.label)
        return _stream_or_spool(sized, options, chain, once=True)
    try:
        return spool_stream(source, source.label, options)
    finally:
        source.close()


def _stream_or_spool(
    source: ByteSource, options: OpenOptions, chain: list[str] | None, once: bool
) -> ByteSource:
    """A sequential source as is when its format reads it in order (a raw disk; also a
    compressor when the stream can be read again), else spooled first.  Owns ``source``."""
    from drivepipe._nesting import spool_stream  # noqa: PLC0415 - _nesting imports this module

    try:
        fmt = get_format(chain[0]) if chain else detect_source(source)
        if fmt.name == "raw" or (fmt.sequential and not once):
            return source
        spooled = spool_stream(source, source.label, options)
    except BaseException:
        source.close()
        raise
    source.close()
    return spooled


def foreign_format(source: ByteSource, head: bytes) -> str | None:
    """Name of a format we recognise but refuse, or None."""
    for offset, magic, name in FOREIGN_MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def detect_source(source: ByteSource, head: bytes | None = None) -> ImageFormat:
    """The format of ``source`` from its magic bytes; raw when nothing else matches."""
    if head is None:
        head = source.head(HEAD_SIZE)
    all_formats = formats()
    for fmt in all_formats.values():
        if fmt.name != "raw" and fmt.detect(head, source):
            return fmt
    foreign = foreign_format(source, head)
    if foreign is not None:
        raise UnsupportedFormat(
            f"{source.label}: looks like a {foreign} image, which drivepipe does not decode; "
            "convert it first (qemu-img convert -O raw) or read it as raw to send it as is"
        )
    return all_formats["raw"]


def detect(path: str) -> ImageFormat:
    """The format of the file at ``path`` (its outermost layer)."""
    source = open_file(path)
    try:
        return detect_source(source)
    finally:
        source.close()


def get_format(name: str) -> ImageFormat:
    try:
        return formats()[name]
    except KeyError:
        known = ", ".join(formats())
        raise UsageError(f"unknown format {name!r} (known: {known})") from None


def parse_chain(format: str | None) -> list[str] | None:
    """``--format``: None or "auto" (detect every layer), one name, or a chain from
    the outside in (``xz,qcow2`` or ``xz>qcow2``)."""
    if not format or format == "auto":
        return None
    names = [n.strip() for n in format.replace(">", ",").split(",")]
    if not all(names) or len(names) > MAX_DEPTH:
        raise UsageError(
            f"bad format chain {format!r}: give up to {MAX_DEPTH} format names from the "
            "outside in, e.g. xz,qcow2"
        )
    for name in names:
        get_format(name)
    return names


def open_image(
    path: str, format: str | None = None, options: OpenOptions | None = None
) -> ImageInput:
    """Open the image at ``path`` (a file, ``-`` for standard input, or an http(s) URL),
    decoding every layer (``disk.qcow2.xz``).

    ``format``: see :func:`parse_chain`; a single name fixes the outermost layer
    and the layers inside it are still detected.
    """
    chain = parse_chain(format)
    opts = options or OpenOptions()
    if path == STDIN:
        source = open_stdin(opts, chain)
    elif is_url(path):
        source = open_url(path, opts, chain)
    else:
        source = open_file(path, opts)
    try:
        image = open_source(source, chain, opts)
    except BaseException:
        source.close()
        raise
    # a URL is shown without its query (signed links carry secrets there)
    image.path = source.label if is_url(path) else path
    return image


def open_source(
    source: ByteSource, chain: list[str] | None = None, options: OpenOptions | None = None
) -> ImageInput:
    """Open the image in ``source`` through every layer; the result owns ``source``.

    If this raises, the caller still owns (and closes) ``source``.
    """
    from drivepipe._nesting import open_layers  # noqa: PLC0415 - _nesting imports this module

    return open_layers(source, chain, options or OpenOptions(), 0)
