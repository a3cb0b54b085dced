"""drivepipe: a streaming, sparse-aware pipeline for moving disk images.

The public API: :class:`Client` (an endpoint and an account: ``upload``,
``download``, ``copy``, drives) and the local jobs :func:`convert`,
:func:`checksum`, :func:`inspect` (see ``docs/api.md``).  The engine lives here
too (extents, the stage contracts, the runner, the registry, errors, stats);
the formats, stages, sources and targets live in ``drivepipe_plugins`` and are
found through entry points.
"""

from typing import TYPE_CHECKING, Any

from drivepipe._errors import (
    AuthError,
    Cancelled,
    ConfigError,
    CorruptImage,
    DiskFull,
    DrivepipeError,
    HTTPError,
    ImageError,
    NetworkError,
    OutputError,
    ResumeRefused,
    SizeMismatch,
    SourceChanged,
    TransferError,
    UnsupportedFormat,
    UsageError,
    VerifyError,
)
from drivepipe._extent import ZERO, Extent, is_zero, split_zeros, zero_chunks
from drivepipe._registry import detect, formats, open_image, open_source, stages
from drivepipe._runner import Pipeline, run_pipeline
from drivepipe._stage import (
    ByteSource,
    CompressionFormat,
    DecodedLayer,
    ImageFormat,
    ImageInput,
    OpenOptions,
    RandomAccess,
    Sink,
    Source,
    Stage,
    TargetOptions,
)
from drivepipe._stats import RunStats, StageStats

if TYPE_CHECKING:
    from drivepipe.jobs import BatchReport, PlanLike

    from .api import Client, ConvertResult, ImageInfo, ReadOptions, checksum, convert, inspect

__version__ = "0.1.0"


#: the public API, imported on first use so that ``import drivepipe`` stays light
_API = ("Client", "ConvertResult", "ImageInfo", "ReadOptions", "checksum", "convert",
        "inspect")


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api  # noqa: PLC0415

        return getattr(api, name)
    raise AttributeError(f"module 'drivepipe' has no attribute {name!r}")


def batch(plan: "PlanLike", **options: Any) -> "BatchReport":
    """Run a batch of transfers: see :func:`drivepipe.jobs.batch` (imported when used)."""
    from drivepipe.jobs import batch as run_batch  # noqa: PLC0415 - keeps `import drivepipe` light

    return run_batch(plan, **options)


__all__ = [
    "ZERO",
    "AuthError",
    "ByteSource",
    "Cancelled",
    "Client",
    "CompressionFormat",
    "ConfigError",
    "ConvertResult",
    "CorruptImage",
    "DecodedLayer",
    "DiskFull",
    "DrivepipeError",
    "Extent",
    "HTTPError",
    "ImageError",
    "ImageFormat",
    "ImageInfo",
    "ImageInput",
    "NetworkError",
    "OpenOptions",
    "OutputError",
    "Pipeline",
    "RandomAccess",
    "ReadOptions",
    "ResumeRefused",
    "RunStats",
    "Sink",
    "SizeMismatch",
    "Source",
    "SourceChanged",
    "Stage",
    "StageStats",
    "TargetOptions",
    "TransferError",
    "UnsupportedFormat",
    "UsageError",
    "VerifyError",
    "__version__",
    "batch",
    "checksum",
    "convert",
    "detect",
    "formats",
    "inspect",
    "is_zero",
    "open_image",
    "open_source",
    "run_pipeline",
    "split_zeros",
    "stages",
    "zero_chunks",
]
