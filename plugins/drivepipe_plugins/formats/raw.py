"""The raw format: the bytes are the image.

In: any byte source (a regular file or block device, a decoded layer, a
spool).  Out: its extents, holes found by SEEK_DATA/SEEK_HOLE where the source
knows them, else by looking for zero blocks.  Size: the source's size.  Random
access: any range of a random source, so chunked uploads can send chunks out of
order.  Refuses nothing itself; the registry refuses bytes that look like
formats we do not decode before falling back to raw.
"""

from __future__ import annotations

from drivepipe._stage import ByteSource, ImageFormat, ImageInput, OpenOptions


class RawFormat(ImageFormat):
    name = "raw"
    detect_order = 1000
    sequential = True

    def detect(self, head: bytes, source: ByteSource) -> bool:
        return True

    def open(self, source: ByteSource, options: OpenOptions) -> ImageInput:
        ranges = source.data_ranges(0, source.size) if source.random else None
        details: dict[str, object] = {"holes_known": ranges is not None}
        is_block = getattr(source, "is_block", None)
        if is_block is not None:
            details["block_device"] = is_block
        return ImageInput(
            path=source.label,
            format=self.name,
            size=source.size,
            source=source,
            data_size=None if ranges is None else sum(hi - lo for lo, hi in ranges),
            file_size=source.size,
            random_access=source if source.random else None,
            details=details,
            resources=[source],
        )
