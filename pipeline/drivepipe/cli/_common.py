"""Options and helpers shared by the commands.

Options that go together are declared once, as the fields of a frozen dataclass (an
option group: :class:`ProgressOptions` and :class:`ImageOptions` here,
:class:`~drivepipe.cli._net.Account`), and a command decorated with
:func:`grouped_options` takes the group as one parameter
(``progress: ProgressOptions = FROM_OPTIONS``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

import typer

from drivepipe._errors import UsageError
from drivepipe._sizes import parse_size
from drivepipe.cli._progress import MODES, resolve_mode

if TYPE_CHECKING:
    from drivepipe.jobs.images import ReadOptions


def optional(flag: str, metavar: str, help: str) -> Any:
    """An option with no default worth showing in ``--help`` (a path, a URL, a name)."""
    return typer.Option(flag, metavar=metavar, help=help, show_default=False)


SizeOpt = Annotated[str | None, optional(
    "--size", "SIZE", "Exact raw size of a raw image on standard input (- --size N): it "
    "streams as is, and a stream that ends short or runs long fails and leaves nothing.")]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format", "-f", metavar="FORMAT",
        help="Input format: auto (detect every layer by magic bytes), one format name "
        "(the outer layer; what is inside is still detected), or a chain from the outside "
        "in such as xz,qcow2 (raw, qcow2, gzip, xz, zstd, bzip2, ...).",
    ),
]
ProgressOpt = Annotated[
    str,
    typer.Option(
        # Checked by resolve_mode (one line), not by a click Choice (a usage block).
        "--progress", metavar="[" + "|".join(MODES) + "]",
        help="auto (a live view on a terminal, else none), rich, plain (a line every few "
        "seconds), json (one object per line on stderr), none.",
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress and no summary on stderr (errors "
                       "and warnings still show).")
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="More detail: when stderr is not a terminal, "
                       "plain progress lines and a summary with one line per stage.")
]
ReadSizeOpt = Annotated[
    str, typer.Option(
        "--read-size", metavar="SIZE", help="Size of each disk read (e.g. 1M, 4M, 16M).")
]
MmapOpt = Annotated[
    bool, typer.Option(
        "--mmap/--no-mmap", help="Read regular files through mmap windows (fewer copies); "
        "--no-mmap reads them with pread, for a file another process may truncate while "
        "it is read.")
]
DirectOpt = Annotated[
    bool, typer.Option(
        "--direct/--no-direct", help="Write an output file's data with O_DIRECT where its "
        "file system takes it: to the disk without the page cache.  It pays for long runs "
        "of data (a dense download), not for scattered short ones, which merge in the "
        "page cache.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace the output file if it already exists.")
]
QueueOpt = Annotated[
    int,
    typer.Option(
        "--queue-depth",
        help="Extents buffered between the reading and the consuming thread (memory bound: "
        "depth x read size).",
    ),
]


ThreadsOpt = Annotated[
    int,
    typer.Option(
        "--threads",
        help="Decoder threads for formats that decode in parallel (compressed qcow2 "
        "clusters, multi-block xz).",
    ),
]


DiskOpt = Annotated[str | None, optional(
    "--disk", "NAME|N", "The disk to take from an image that holds several (an OVA): its "
    "id, file name or number (1 is the first); inspect lists them.")]
SpoolDirOpt = Annotated[
    str | None,
    typer.Option(
        "--spool-dir", metavar="DIR",
        help="Where a compressed image whose inner format needs random reads (qcow2 in "
        "gzip, bzip2 or single-block xz) is decoded to first, as a sparse temporary file "
        "removed at once; default: the system temp dir. Multi-block xz and multi-frame "
        "zstd need no spool.",
    ),
]


R = TypeVar("R")

#: the default of an option group parameter (see :func:`grouped_options`, which always
#: passes the group its options make)
FROM_OPTIONS: Final[Any] = None


def grouped_options(command: Callable[..., R]) -> Callable[..., R]:
    """Give ``command`` the options of each option group it takes, in that parameter's place.

    A parameter annotated with a dataclass is an option group: typer sees its fields
    (``Annotated`` option types with their defaults) instead, in that place of ``--help``,
    and ``command`` is called with the dataclass those options make.  Its default is
    :data:`FROM_OPTIONS`, or an instance of the group whose values are the defaults
    (``image: ImageOptions = LOCAL_IMAGE``).
    """
    signature = inspect.signature(command, eval_str=True)
    groups: dict[str, tuple[type[Any], list[str]]] = {}
    params: list[inspect.Parameter] = []
    for param in signature.parameters.values():
        group = param.annotation
        if not (isinstance(group, type) and dataclasses.is_dataclass(group)):
            params.append(param)
            continue
        hints = inspect.get_annotations(group, eval_str=True)
        fields = dataclasses.fields(group)
        # a group instance as the default gives the command its own defaults
        defaults = param.default if isinstance(param.default, group) else None
        groups[param.name] = (group, [f.name for f in fields])
        params += [inspect.Parameter(
            f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name],
            default=f.default if defaults is None else getattr(defaults, f.name))
            for f in fields]
    if not groups:
        raise TypeError(f"{command.__name__} takes no option group")

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        for name, (group, names) in groups.items():
            kwargs[name] = group(**{field: kwargs.pop(field) for field in names})
        return command(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


@dataclasses.dataclass(frozen=True)
class ProgressOptions:
    """``--progress``, ``-q`` and ``-v``: what goes to stderr while a command runs."""

    progress: ProgressOpt = "auto"
    quiet: QuietOpt = False
    verbose: VerboseOpt = False

    @property
    def mode(self) -> str:
        """The progress mode the three ask for together (see :func:`progress_mode`)."""
        return progress_mode(self.progress, self.quiet, self.verbose)


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How a command reads its image: ``--format``, ``--read-size``, ``--queue-depth``,
    ``--threads``, ``--spool-dir``, ``--disk``."""

    fmt: FormatOpt = "auto"
    read_size: ReadSizeOpt = "4M"
    queue_depth: QueueOpt = 16
    threads: ThreadsOpt = 2
    spool_dir: SpoolDirOpt = None
    disk: DiskOpt = None
    mmap: MmapOpt = True

    def read(self) -> ReadOptions:
        """The library's read options, each value checked with its flag's name
        (``--queue-depth`` too: the caller passes :attr:`queue_depth` on)."""
        from drivepipe.jobs.images import ReadOptions  # noqa: PLC0415 - loaded on first use

        positive(self.queue_depth, "--queue-depth")
        positive(self.threads, "--threads")
        return ReadOptions(format=self.fmt, read_size=positive_size(self.read_size, "--read-size"),
                           threads=self.threads, spool_dir=self.spool_dir, disk=self.disk,
                           mmap=self.mmap)


def progress_mode(progress: str, quiet: bool, verbose: bool) -> str:
    """The progress mode ``--progress``, ``-q`` and ``-v`` ask for together."""
    if quiet and verbose:
        raise UsageError("-q/--quiet and -v/--verbose contradict each other: pick one")
    if quiet:
        return "none"
    if verbose and progress == "auto":
        # a terminal gets the live view anyway; a log file gets lines instead of nothing
        return "plain" if resolve_mode(progress) == "none" else "rich"
    return resolve_mode(progress)


def positive(value: int, option: str) -> int:
    """``value`` if at least 1; else one line naming ``option``."""
    if value < 1:
        raise UsageError(f"{option} must be at least 1, got {value}")
    return value


def positive_size(text: str, option: str) -> int:
    """A size option that must be at least one byte (``--read-size 0`` makes no sense)."""
    size = parse_size(text)
    if size < 1:
        raise UsageError(f"{option} must be at least 1 byte, got {text!r}")
    return size
