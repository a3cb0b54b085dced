"""bzip2: a bzip2 file (one or more streams, as pbzip2/lbzip2 write) in, raw out.

Detect: ``BZh`` followed by a block-size digit ``1``..``9``.  Size: bzip2
records no size anywhere, so a counting pass decodes the whole file first
(reported as the "counting" phase; ~45 MB/s with stdlib ``bz2``).  Every
stream's CRC is checked by the decoder; the stream pass must produce exactly
the counted size.  Refused: truncated or corrupt streams, trailing bytes that
are not zero padding.
"""

from __future__ import annotations

import bz2
from collections.abc import Iterator

from drivepipe._stage import ByteSource, CompressionFormat, DecodedLayer, OpenOptions
from drivepipe_plugins.formats._codec import StreamDecompressor, StreamLayer, decode_streams


def _new_stream() -> StreamDecompressor:
    return bz2.BZ2Decompressor()


def decode_bzip2(chunks: Iterator[memoryview], out: int) -> Iterator[bytes]:
    """Decode every bzip2 stream in turn."""
    return decode_streams(chunks, out, _new_stream, (OSError, EOFError, ValueError))


class Bzip2Format(CompressionFormat):
    name = "bzip2"
    detect_order = 20

    def detect(self, head: bytes, source: ByteSource) -> bool:
        return len(head) >= 4 and head[:3] == b"BZh" and 0x31 <= head[3] <= 0x39

    def open_layer(self, source: ByteSource, options: OpenOptions) -> DecodedLayer:
        details: dict[str, object] = {"compression": "bzip2", "size_from": "counting pass"}
        return StreamLayer(source, self.name, "bunzip2", decode_bzip2, details)
