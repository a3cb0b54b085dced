"""The byte-moving views: direct upload, download (redirect + signed URL), chunk bodies.

Direct upload: the body (exactly ``Content-Length`` bytes, the drive's size)
streams in large ``readinto`` calls straight to a sparse temporary file; the
drive appears only when the last byte has arrived, a short body leaves
nothing.  Answer: 201, ``Location``, and the UUID (plus a newline) as the body.

Download: ``/drives/{uuid}/download/`` (authenticated) redirects (302) to
``/direct/{uuid}/download/?expires=..&sig=..``, which needs no credentials and
serves the bytes with ETag, Accept-Ranges and one ``Range`` (206/416; several
ranges get the whole body).  Data spans go out with ``sendfile``, holes from
the shared zero buffer, never read from disk.

Chunk bodies: ``POST /direct/{uuid}/chunk/{n}/?size=S&expires=..&sig=..`` (the
link ``upload_chunk`` hands out) must carry exactly that chunk's length.
Refused: bad or expired signatures (403), lengths that do not match (400),
over the maximum size (413), chunks already there (416).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final
from urllib.parse import unquote

from drivepipe._extent import Buffer
from drivepipe.server._body import BodyReader
from drivepipe.server._errors import ApiError, busy, permission, validation
from drivepipe.server._faults import Fault
from drivepipe.server._http import ClientGone, HandlerBase
from drivepipe.server._overlap import OverlappedSink
from drivepipe.server._ranges import Unsatisfiable, parse_range
from drivepipe.server._sender import SpanSender
from drivepipe.server._store import DOWNLOADABLE

BODY_BUFFER: Final = 4 << 20
NAME_MAX: Final = 256


class TransferViews(HandlerBase):
    """Views that move drive bytes; the router calls them by name."""

    # --- receiving --------------------------------------------------------

    def upload_length(self) -> int:
        """The direct upload's announced size, checked before any body byte is read."""
        size = self.require_length()
        if size == 0:
            raise validation("an empty body is not a disk image", "Content-Length")
        if size > self.ctx.store.max_size:
            raise ApiError(
                413, "validation",
                f"{size} bytes is over the maximum drive size {self.ctx.store.max_size}",
                "Content-Length",
            )
        return size

    def direct_upload(self) -> None:
        size = self.upload_length()
        incoming = self.ctx.store.begin_direct(size, self._upload_name())
        try:
            self.receive_body(incoming.write, size)
            rec = incoming.finish()
        except BaseException:
            incoming.abort()
            raise
        location = f"{self.base_url()}drives/{rec.uuid}/"
        self.reply(
            201, f"{rec.uuid}\n".encode(), "text/plain; charset=utf-8",
            (("Location", location),),
        )

    def _upload_name(self) -> str:
        """The file name after ``drives/upload/`` (curl --upload-file appends it), if any."""
        tail = self.path_only.split("/drives/upload", 1)[-1].strip("/")
        name = unquote(tail.rsplit("/", 1)[-1])
        return name[:NAME_MAX] if name.isprintable() else ""

    def receive_body(self, sink: Callable[[Buffer], None], length: int) -> None:
        """Stream ``length`` body bytes into ``sink``: large reads, writes overlapped."""
        slots = self.ctx.upload_slots
        if not slots.acquire(timeout=self.ctx.config.upload_wait):
            raise busy("too many uploads at once: try again later")
        fault = self.ctx.faults.take("drop_upload", self.command, self.path)
        body = BodyReader(self.rfile, self.connection, length, fault.after if fault else -1,
                          self.ctx.config.rate_limit)
        try:
            with body:
                self._pump(body, sink, length)
        except ClientGone:
            if body.budget == 0:
                self.abort_connection()
            raise
        finally:
            self.body_left = body.left
            slots.release()

    def _pump(self, body: BodyReader, sink: Callable[[Buffer], None], length: int) -> None:
        if length <= BODY_BUFFER:
            buf = memoryview(bytearray(length))
            filled = 0
            while body.left:
                filled += body.readinto(buf[filled:])
            sink(buf)
            return
        with OverlappedSink(sink, BODY_BUFFER) as out:
            while body.left:
                piece = out.buffer()
                try:
                    n = body.readinto(memoryview(piece))
                except BaseException:
                    out.give_back(piece)
                    raise
                out.submit(piece, n)
            out.finish()

    def chunk_params(self, uuid: str, number: str) -> tuple[int, int]:
        """The chunk number and nominal size a signed chunk link names."""
        size = self.query.get("size", "")
        if not size.isdigit():
            raise permission("the link is not a chunk upload link")
        reason = self.ctx.signer.check(
            "chunk", (uuid, number, size), self.query.get("expires", ""),
            self.query.get("sig", ""),
        )
        if reason:
            raise permission(reason)
        return int(number), int(size)

    def chunk_length(self, uuid: str, number: str) -> tuple[int, int]:
        """Checks a chunk POST before its body: ``(chunk number, chunk size)``."""
        k, size = self.chunk_params(uuid, number)
        _, length = self.ctx.store.check_chunk(uuid, k, size)
        declared = self.require_length()
        if declared != length:
            raise validation(
                f"chunk {k} is {length} bytes but the body has {declared}", "Content-Length"
            )
        return k, size

    def chunk_body(self, uuid: str, number: str) -> None:
        k, size = self.chunk_length(uuid, number)
        writer = self.ctx.store.begin_chunk(uuid, k, size)
        try:
            self.receive_body(writer.write, writer.length)
            rec = writer.finish()
        except BaseException:
            writer.abort()
            raise
        self.reply_json(200, {
            "uuid": uuid, "chunk_number": k, "status": rec.status,
            "received": len(rec.received), "chunks": rec.chunks,
        })

    # --- serving ----------------------------------------------------------

    def download_redirect(self, uuid: str) -> None:
        # 404 and "still uploading" here, before the client follows anything.
        rec = self.ctx.store.get(uuid)
        if rec.status not in DOWNLOADABLE:
            raise validation(f"drive {uuid} is {rec.status}, not downloadable yet", "status")
        query = self.ctx.signer.query("download", (uuid,), self.ctx.config.link_ttl)
        target = f"{self.base_url()}direct/{uuid}/download/?{query}"
        self.reply(302, b"", None, (("Location", target),))

    def signed_download(self, uuid: str) -> None:
        reason = self.ctx.signer.check(
            "download", (uuid,), self.query.get("expires", ""), self.query.get("sig", "")
        )
        if reason:
            raise permission(reason)
        fd, rec = self.ctx.store.open_read(uuid)
        try:
            self._serve(fd, uuid, os.fstat(fd).st_size, f'"{uuid}-{rec.generation}-{rec.size}"')
        finally:
            os.close(fd)

    def _serve(self, fd: int, uuid: str, size: int, etag: str) -> None:
        header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            header = None  # the client's copy is stale: send it all
        try:
            span = parse_range(header, size)
        except Unsatisfiable:
            raise ApiError(
                416, "validation", f"the range is outside the drive's {size} bytes",
                headers=(("Content-Range", f"bytes */{size}"),),
            ) from None
        start, end = span if span is not None else (0, size)
        self.send_response(206 if span is not None else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Content-Disposition", f'attachment; filename="{uuid}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if span is not None:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if self.command != "HEAD":
            self.send_span(fd, start, end)

    def _download_fault(self) -> Fault | None:
        faults = self.ctx.faults
        return faults.take("drop_download", self.command, self.path) or faults.take(
            "cut_download", self.command, self.path
        )

    def send_span(self, fd: int, start: int, end: int) -> None:
        """Send ``[start, end)``: data with sendfile, holes from the zero buffer."""
        fault = self._download_fault()
        stop = min(end, start + fault.after) if fault else end
        SpanSender(self.connection, fd).send(start, stop)
        if fault is not None and stop < end:
            if fault.kind == "drop_download":
                self.abort_connection()
            self.close_connection = True
