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

An :class:`ImageFormat` is the plugin that turns a path into those parts: it
recognises its magic bytes, finds the exact raw size by the cheapest exact
method, and returns an :class:`ImageInput` (a source plus decoder stages).
Formats are found through the ``drivepipe.formats`` entry-point group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

from ._extent import Extent

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


class Sink(ABC, Generic[T]):
    """Consumes a whole stream of ``size`` bytes and returns a result."""

    name: str = "sink"

    @abstractmethod
    def consume(self, extents: Iterator[Extent], size: int) -> T:
        """Take every extent; return only when the result is durable."""

    def abort(self) -> None:
        """Undo partial work after a failure (remove temp files, cancel uploads)."""

    def close(self) -> None:
        """Release resources; called once after consume or abort."""


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
    #: called during work that happens before streaming (counting passes)
    on_phase: PhaseCallback | None = None
    #: drop pages behind the read cursor for files larger than this (None: auto)
    drop_cache_above: int | None = None


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

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
        self.source.close()


class ImageFormat(ABC):
    """A plugin that recognises and opens one image format."""

    name: ClassVar[str]
    #: lower runs first in detection; raw is the fallback and runs last
    detect_order: ClassVar[int] = 50

    @abstractmethod
    def detect(self, head: bytes) -> bool:
        """True if ``head`` (the first 4 KiB or less) starts an image of this format."""

    @abstractmethod
    def open(self, path: str, options: OpenOptions) -> ImageInput:
        """Open ``path``; raise ImageError subclasses for anything refused."""
