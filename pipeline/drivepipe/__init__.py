"""drivepipe: a streaming, sparse-aware pipeline for moving disk images.

The engine lives here (extents, the stage contracts, the runner, the registry,
errors, stats); the stages live in ``drivepipe_plugins`` and are found through
entry points.
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
    SizeMismatch,
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
)
from drivepipe._stats import RunStats, StageStats

if TYPE_CHECKING:
    from drivepipe.jobs import BatchReport, PlanLike

__version__ = "0.1.0"


def batch(plan: "PlanLike", **options: Any) -> "BatchReport":
    """Run a batch of transfers: see :func:`drivepipe.jobs.batch` (imported when used)."""
    from drivepipe.jobs import batch as run_batch  # noqa: PLC0415 - keeps `import drivepipe` light

    return run_batch(plan, **options)


__all__ = [
    "ZERO",
    "AuthError",
    "ByteSource",
    "Cancelled",
    "CompressionFormat",
    "ConfigError",
    "CorruptImage",
    "DecodedLayer",
    "DiskFull",
    "DrivepipeError",
    "Extent",
    "HTTPError",
    "ImageError",
    "ImageFormat",
    "ImageInput",
    "NetworkError",
    "OpenOptions",
    "OutputError",
    "Pipeline",
    "RandomAccess",
    "RunStats",
    "Sink",
    "SizeMismatch",
    "Source",
    "Stage",
    "StageStats",
    "TransferError",
    "UnsupportedFormat",
    "UsageError",
    "VerifyError",
    "__version__",
    "batch",
    "detect",
    "formats",
    "is_zero",
    "open_image",
    "open_source",
    "run_pipeline",
    "split_zeros",
    "stages",
    "zero_chunks",
]
