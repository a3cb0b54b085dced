"""The block device target ("device"): a download's stream in, written over a whole device.

In: the stream in order and its exact size.  Out: every byte of
``[0, size)`` on the device: data written as it comes (zeros included), holes
zeroed explicitly (``BLKZEROOUT``, else ``fallocate(ZERO_RANGE)``, else written
zeros), since a device that was used before does not read as zeros where
nothing is written.  Then ``fsync``; nothing is renamed (a device has no
temporary name) and bytes past ``size`` are left as they are.

Refused, before a byte is written: a path that is not a block device, a device
smaller than the stream, and a device in use: mounted (``/proc/self/mounts``,
also through a partition of it), held by another block device
(``/sys/class/block/NAME/holders``: LVM, dm-crypt, RAID), or opened exclusively
by someone else (``O_EXCL`` fails with ``EBUSY``).  A failure half-way leaves the
device half-written: there is nothing to roll back, and the error says so.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

from drivepipe._errors import OutputError
from drivepipe._extent import Extent, zero_chunks
from drivepipe._files import WRITE_SLICE, output_error, zero_range
from drivepipe._stage import Sink, TargetOptions

#: ioctl(BLKZEROOUT, uint64_t[2] {start, length}) = _IO(0x12, 127)
BLKZEROOUT = 0x127F
#: ioctl(BLKGETSIZE64, uint64_t *) = _IOR(0x12, 114, size_t)
BLKGETSIZE64 = 0x80081272


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _sysfs_name(rdev: int) -> str | None:
    """The kernel's name of the device (``sda``, ``loop3``, ``dm-0``)."""
    link = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    try:
        return os.path.basename(os.path.realpath(link))
    except OSError:
        return None


def _partitions(name: str) -> list[str]:
    """``name`` and the partitions on it (``sda``, ``sda1``, ...)."""
    found = [name]
    base = f"/sys/class/block/{name}"
    try:
        entries = os.listdir(base)
    except OSError:
        return found
    found += [e for e in entries if os.path.exists(f"{base}/{e}/partition")]
    return found


def in_use(path: str) -> str | None:
    """Why the block device at ``path`` is in use (a mount, a holder), or None."""
    rdev = os.stat(path).st_rdev
    name = _sysfs_name(rdev)
    names = _partitions(name) if name else []
    for part in names:
        try:
            holders = os.listdir(f"/sys/class/block/{part}/holders")
        except OSError:
            holders = []
        if holders:
            return f"{part} is held by {', '.join(sorted(holders))} (LVM, dm-crypt or RAID)"
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = f.read().splitlines()
    except OSError:
        mounts = []
    for line in mounts:
        fields = line.split()
        if len(fields) < 2 or not fields[0].startswith("/"):
            continue
        try:
            st = os.stat(fields[0])
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and _sysfs_name(st.st_rdev) in names:
            return f"{fields[0]} is mounted on {fields[1].replace(chr(92) + '040', ' ')}"
    return None


class DeviceWriter(Sink[str]):
    """Writes the whole stream over the block device ``path``; returns ``path``."""

    name = "write"

    @classmethod
    def open_target(cls, spec: str, options: TargetOptions) -> DeviceWriter:
        """``device:/dev/sdX`` (or a block device's path): written over, in place."""
        return cls(spec, sync=options.sync)

    def __init__(self, path: str, *, sync: bool = True) -> None:
        self.path = path
        self.sync = sync
        self.label = path
        self.fd = -1
        if not is_block_device(path):
            raise OutputError(f"{path}: not a block device")
        busy = in_use(path)
        if busy:
            raise OutputError(f"{path}: in use ({busy}); unmount it first")

    def _open(self, size: int) -> None:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise OutputError(f"{self.path}: in use (another program holds it open "
                                  "exclusively)") from exc
            raise output_error(self.path, exc) from exc
        capacity = self._capacity()
        if capacity < size:
            raise OutputError(f"{self.path}: {capacity} bytes, too small for the {size} bytes "
                              "of the drive")

    def _capacity(self) -> int:
        buf = bytearray(8)
        try:
            fcntl.ioctl(self.fd, BLKGETSIZE64, buf)
            return int(struct.unpack("=Q", bytes(buf))[0])
        except OSError:
            return os.lseek(self.fd, 0, os.SEEK_END)

    def consume(self, extents: Iterator[Extent], size: int) -> str:
        self._open(size)
        for ext in extents:
            if ext.data is None:
                self._zero(ext.offset, ext.length)
            else:
                self._write(ext.offset, memoryview(ext.data))
        if self.sync:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                raise output_error(self.path, exc) from exc
        return self.path

    def _write(self, offset: int, view: memoryview) -> None:
        try:
            while view:
                n = os.pwrite(self.fd, view[:WRITE_SLICE], offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    def _zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros, the cheapest way the device has."""
        # BLKZEROOUT needs 512-byte alignment; the unaligned edges are written.
        lo, hi = -(-offset // 512) * 512, (offset + length) // 512 * 512
        if hi - lo >= 1 << 20 and self._zero_out(lo, hi - lo):
            self._write_zeros(offset, lo - offset)
            self._write_zeros(hi, offset + length - hi)
            return
        self._write_zeros(offset, length)

    def _zero_out(self, offset: int, length: int) -> bool:
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
            return True
        except OSError:
            return zero_range(self.fd, offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        for chunk in zero_chunks(length):
            self._write(offset, chunk)
            offset += len(chunk)

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
