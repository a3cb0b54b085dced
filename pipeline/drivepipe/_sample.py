"""Sample disk images for ``drivepipe demo`` and ``bench``, made without qemu-img.

:func:`make_sample_raw` writes a sparse raw image that looks like a small disk
(a partition-table-like header, scattered data of varied compressibility,
written zeros, large holes).  :func:`write_qcow2` turns a raw image into a
valid qcow2 v3 (``qemu-img check`` clean): zero blocks stay unallocated,
clusters are stored plain or deflate-compressed.  It is a writer for samples,
not a general converter: the whole L2/refcount metadata is built in memory
(a few KiB per GiB of image), and host files up to 2 GiB.
"""

from __future__ import annotations

import os
import random
import struct
import zlib

from drivepipe._extent import is_zero

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
REFCOUNT_ORDER = 4  # 16-bit refcounts, qemu's default
COPIED = 1 << 63
COMPRESSED = 1 << 62


def make_sample_raw(path: str, size: int, *, seed: int = 1, data_fraction: float = 0.1) -> int:
    """Write a sparse sample disk of ``size`` bytes; returns the data bytes written."""
    rng = random.Random(seed)
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(b"\xeb\x63\x90DRIVEPIPE" + rng.randbytes(400) + b"\x55\xaa")
        target = int(size * data_fraction)
        while written < target:
            n = min(rng.choice((64 << 10, 256 << 10, 1 << 20, 4 << 20)), target - written)
            off = rng.randrange(0, max(1, size - n)) & ~4095
            kind = rng.random()
            if kind < 0.4:
                block = rng.randbytes(n)  # incompressible, like already-compressed files
            elif kind < 0.9:
                line = b"drivepipe sample text %d\n" % rng.randrange(1 << 30)
                block = (line * (n // len(line) + 1))[:n]
            else:
                block = bytes(n)  # written zeros: data on disk, zeros in content
            f.seek(off)
            f.write(block)
            written += n
    return written


def _compress(cluster: bytes) -> bytes | None:
    comp = zlib.compressobj(6, zlib.DEFLATED, -12)
    out = comp.compress(cluster) + comp.flush()
    return out if len(out) < len(cluster) - 512 else None


def _pack_data(raw_path: str, clusters: int, compress: bool) -> tuple[
    dict[int, int | tuple[int, int]], bytes
]:
    """Data area relative to its start, and per guest cluster: offset or (offset, length)."""
    where: dict[int, int | tuple[int, int]] = {}
    body = bytearray()
    with open(raw_path, "rb") as raw:
        for index in range(clusters):
            chunk = os.pread(raw.fileno(), CLUSTER, index * CLUSTER)
            if is_zero(chunk):
                continue
            chunk = chunk.ljust(CLUSTER, b"\0")
            packed = _compress(chunk) if compress else None
            if packed is None:
                body.extend(bytes(-len(body) % CLUSTER))  # plain clusters are aligned
                where[index] = len(body)
                body.extend(chunk)
            else:
                where[index] = (len(body), len(packed))
                body.extend(packed)
    body.extend(bytes(-len(body) % CLUSTER))
    return where, bytes(body)


def write_qcow2(raw_path: str, out_path: str, *, compress: bool = False) -> None:
    """Write ``raw_path`` as a qcow2 v3 image (64 KiB clusters) at ``out_path``."""
    size = os.path.getsize(raw_path)
    clusters = (size + CLUSTER - 1) // CLUSTER
    where, body = _pack_data(raw_path, clusters, compress)
    l1_size = max(1, (clusters + L2_ENTRIES - 1) // L2_ENTRIES)
    l1_clusters = (l1_size * 8 + CLUSTER - 1) // CLUSTER
    tables = sorted({index // L2_ENTRIES for index in where})
    # Host layout: header | refcount table | refcount block | L1 | L2 tables | data.
    l1_offset = 3 * CLUSTER
    l2_base = l1_offset + l1_clusters * CLUSTER
    data_start = l2_base + len(tables) * CLUSTER
    total_clusters = (data_start + len(body)) // CLUSTER
    if total_clusters > CLUSTER * 8 >> REFCOUNT_ORDER:
        raise ValueError("the sample qcow2 writer handles host files up to 2 GiB")

    shift = 62 - (CLUSTER_BITS - 8)
    counts = [1] * (data_start // CLUSTER) + [0] * (len(body) // CLUSTER)
    l1 = [0] * l1_size
    l2 = {t: [0] * L2_ENTRIES for t in tables}
    for n, table in enumerate(tables):
        l1[table] = (l2_base + n * CLUSTER) | COPIED
    for index, place in where.items():
        if isinstance(place, int):
            entry = (data_start + place) | COPIED
            counts[(data_start + place) // CLUSTER] += 1
        else:
            coff, length = data_start + place[0], place[1]
            extra = (coff + length - 1) // 512 - coff // 512
            entry = COMPRESSED | (extra << shift) | coff
            for cl in range(coff // CLUSTER, (coff + length - 1) // CLUSTER + 1):
                counts[cl] += 1
        l2[index // L2_ENTRIES][index % L2_ENTRIES] = entry

    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb", 3, 0, 0, CLUSTER_BITS, size, 0, l1_size, l1_offset,
        CLUSTER, 1, 0, 0,  # refcount table at cluster 1, one cluster long; no snapshots
        0, 0, 0,  # incompatible, compatible, autoclear features
        REFCOUNT_ORDER, 104,
    )
    with open(out_path, "wb") as out:
        out.write(header.ljust(CLUSTER, b"\0"))  # zeros after it end the extensions
        out.write(struct.pack(">Q", 2 * CLUSTER).ljust(CLUSTER, b"\0"))
        out.write(struct.pack(f">{total_clusters}H", *counts).ljust(CLUSTER, b"\0"))
        out.write(struct.pack(f">{l1_size}Q", *l1).ljust(l1_clusters * CLUSTER, b"\0"))
        for table in tables:
            out.write(struct.pack(f">{L2_ENTRIES}Q", *l2[table]))
        out.write(body)
