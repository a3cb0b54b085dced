"""qcow2 (work in progress): recognised, not decoded yet."""

from __future__ import annotations

from drivepipe._errors import UnsupportedFormat
from drivepipe._stage import ImageFormat, ImageInput, OpenOptions


class Qcow2Format(ImageFormat):
    name = "qcow2"
    detect_order = 10

    def detect(self, head: bytes) -> bool:
        return head[:4] == b"QFI\xfb"

    def open(self, path: str, options: OpenOptions) -> ImageInput:
        raise UnsupportedFormat(f"{path}: qcow2 decoding is not available yet")
