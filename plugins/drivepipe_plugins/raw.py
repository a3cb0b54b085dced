"""The raw format: the file's bytes are the image.

In: a regular file or block device.  Out: its extents, holes found by
SEEK_DATA/SEEK_HOLE.  Size: ``st_size`` (block devices: seek to the end).
Random access: any range, so chunked uploads can send chunks out of order.
Refuses nothing itself; the registry refuses files that look like formats we
do not decode before falling back to raw.
"""

from __future__ import annotations

from drivepipe._stage import ImageFormat, ImageInput, OpenOptions

from .sparse_read import SparseFileReader


class RawFormat(ImageFormat):
    name = "raw"
    detect_order = 1000

    def detect(self, head: bytes) -> bool:
        return True

    def open(self, path: str, options: OpenOptions) -> ImageInput:
        reader = SparseFileReader(
            path, read_size=options.read_size, drop_cache_above=options.drop_cache_above
        )
        return ImageInput(
            path=path,
            format=self.name,
            size=reader.size,
            source=reader,
            data_size=reader.data_size() if reader.seekable_holes else None,
            file_size=reader.size,
            random_access=reader,
            details={"block_device": reader.is_block, "holes_known": reader.seekable_holes},
        )
