"""The resumable file target ("resumable-file"): a download's stream in, ``NAME`` out.

In: the stream in order, from byte 0.  The bytes go to ``NAME.part`` (sparse:
holes and all-zero 4 KiB blocks are not written) and every finished block of
``block_size`` bytes is recorded with its xxh3-64 in the journal
``NAME.part.journal`` once its bytes are in the file (saved atomically every
``checkpoint_interval`` seconds by a thread of its own, behind the stream, and
in the writing thread whenever the run stops).  Since the stream is written in
order, the journal is a prefix of whole blocks.

Resuming: :meth:`ResumableFileWriter.open` keeps a journal of the same source
(identity and block size; a source without validators is never resumed);
:meth:`ResumableFileWriter.kept` then reads that prefix once, checks each block
against its journal digest and yields it (so the verify stage hashes it in the
same read), stopping at the first block that no longer matches.  Everything
after the good prefix is punched out of the file (old bytes of a run that wrote
further must not hide under blocks that sparse writing skips), and the stream's
fetched part is written from there on; the kept part is not written again.

Out: once the whole stream is written (and verified upstream), the file is
fsynced and published under ``NAME`` (never over an existing file without
``force``) and the journal is deleted.  On any failure, Ctrl-C included, the
``.part`` and its journal are kept for the next run; a full disk keeps what is
journaled (:class:`~drivepipe.DiskFull` says how much).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import cache

import xxhash

from drivepipe._errors import DiskFull, DrivepipeError
from drivepipe._extent import Extent, zero_chunks
from drivepipe._files import SparseOutput, check_target, publish, punch_hole
from drivepipe._registry import open_file
from drivepipe._sizes import format_size
from drivepipe._stage import Sink
from drivepipe._stats import StageStats
from drivepipe._verify import hash_extent
from drivepipe.resume.download_journal import (
    JOURNAL_SUFFIX,
    DownloadJournal,
    SourceIdentity,
    load_journal,
    remove_journal,
)
from drivepipe.resume.saver import BackgroundSaver

PART_SUFFIX = ".part"


@cache
def _zero_digest(length: int) -> str:
    """The journal digest of ``length`` zero bytes (a hole block costs no hashing)."""
    return _block_digest([Extent.hole(0, length)])


def _block_digest(extents: list[Extent]) -> str:
    h = xxhash.xxh3_64()
    for ext in extents:
        hash_extent(h, ext)
    return h.hexdigest()


class _BlockHasher:
    """The journal digest of each block, from the in-order stream (holes hashed lazily)."""

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_64()
        self._zeros = 0
        self._data = False

    def add(self, data: memoryview | None, length: int) -> None:
        if data is None:
            self._zeros += length
            return
        self._flush_zeros()
        self._data = True
        self._hash.update(data)

    def _flush_zeros(self) -> None:
        hash_extent(self._hash, Extent.hole(0, self._zeros))
        self._zeros = 0

    def digest(self, length: int) -> str:
        if not self._data:
            found = _zero_digest(length)
        else:
            self._flush_zeros()
            found = self._hash.hexdigest()
        self._hash.reset()
        self._zeros, self._data = 0, False
        return found


class ResumableFileWriter(Sink[str]):
    """Writes the stream to ``target + ".part"`` with a journal; publishes ``target``."""

    name = "write"

    def __init__(
        self,
        target: str,
        *,
        force: bool = False,
        block_size: int = 4 << 20,
        checkpoint_interval: float = 1.0,
        notify: Callable[[str], None] | None = None,
        direct: bool = True,
    ) -> None:
        check_target(target, force=force)
        self.target = target
        self.part = target + PART_SUFFIX
        self.journal_path = self.part + JOURNAL_SUFFIX
        self.label = self.part
        self.force = force
        self.block_size = block_size
        self.direct = direct
        self.checkpoint_interval = checkpoint_interval
        self.notify = notify or (lambda text: None)
        self.journal: DownloadJournal | None = None
        self.out: SparseOutput | None = None
        #: the stream below this offset is on disk already (the checked kept prefix)
        self.kept_end = 0
        self._candidates = 0
        self._dense = False
        self._stats: StageStats | None = None
        self._hasher = _BlockHasher()
        #: finished blocks (index, digest, the output's bytes taken by then) not yet
        #: journaled because their bytes may not be in the file yet
        self._pending: deque[tuple[int, str, int]] = deque()
        self._dirty = False
        self._last_save = time.monotonic()
        #: saves the periodic checkpoints behind the stream (made on the first one)
        self._saver: BackgroundSaver | None = None
        self._save_due = False  # a checkpoint is due: save at the next landed block

    # -- before the stream --

    def open(self, identity: SourceIdentity, *, resumable: bool = True) -> int:
        """Continue a journal of this source or start a fresh ``.part``.

        Returns the bytes a journal offers to keep (checked later, by :meth:`kept`).
        ``resumable=False`` (the source has no validators) always starts over.
        """
        journal = load_journal(self.journal_path)
        found = journal is not None or os.path.lexists(self.part)
        if journal is not None and journal.matches(identity, self.block_size) \
                and os.path.isfile(self.part) and resumable:
            self._candidates = _prefix_blocks(journal)
            journal.blocks = {i: journal.blocks[i] for i in range(self._candidates)}
        else:
            if found and not resumable:
                self.notify(f"{self.part}: the server gives no ETag or Last-Modified, so the "
                            "kept part cannot be trusted to be the same file")
            if found:
                self.notify(f"{self.part}: not from this source (or changed since), "
                            "starting over")
            self.discard()
            journal = DownloadJournal(identity, self.block_size)
            self._candidates = 0
        self.journal = journal
        self.out = SparseOutput(self.part, identity.size, direct=self.direct)
        journal.save(self.journal_path)
        return journal.done_bytes()

    def kept(self) -> Iterator[Extent]:
        """The journal's prefix, read once: each block checked, then yielded.

        Stops at the first block whose bytes no longer match its digest; then the
        rest of the file is freed and the journal forgets it.  The stream from
        :attr:`kept_end` on must come from the source.
        """
        journal = self.journal
        assert journal is not None, "open() first"
        bad = None
        if self._candidates:
            reader = open_file(self.part)
            try:
                for index in range(self._candidates):
                    offset, length = journal.block_span(index)
                    block = list(reader.read_range(offset, length))
                    if _block_digest(block) != journal.blocks[index]:
                        bad = index
                        break
                    self.kept_end = offset + length
                    yield from block
            finally:
                reader.close()
        self._cut_after(bad)

    def _cut_after(self, bad: int | None) -> None:
        journal, out = self.journal, self.out
        assert journal is not None and out is not None
        first = self.kept_end // self.block_size
        for index in [i for i in journal.blocks if i >= first]:
            del journal.blocks[index]
        left = journal.identity.size - self.kept_end
        if left and not punch_hole(out.fd, self.kept_end, left):
            self._dense = os.fstat(out.fd).st_blocks > 0  # old bytes may be there: write zeros
        self._report_kept()
        if self.kept_end or bad is not None:
            extra = "" if bad is None else (
                f"; block {bad} (bytes {self.kept_end}-{self.kept_end + self.block_size - 1}) "
                "changed on disk since it arrived, so the rest is fetched again from there")
            self.notify(f"resuming {self.part}: {format_size(self.kept_end)} of "
                        f"{format_size(journal.identity.size)} kept{extra}")

    # -- the stream --

    def meter(self, stats: StageStats) -> bool:
        self._stats = stats
        self._report_kept()
        return False

    def _report_kept(self) -> None:
        # the kept prefix is read in the producer thread, maybe before meter() is called
        if self._stats is not None:
            self._stats.extra["kept"] = self.kept_end
            if self.out is not None and self.out.direct_bytes:
                self._stats.extra["direct"] = self.out.direct_bytes

    def consume(self, extents: Iterator[Extent], size: int) -> str:
        assert self.out is not None and self.journal is not None, "open() first"
        try:
            for ext in extents:
                if ext.end <= self.kept_end:
                    continue  # the checked kept prefix: on disk already
                self._write(ext)
                self._journal(ext)
            self.out.sync()
            self._report_kept()  # after the sync: every direct write is counted
        except DiskFull as exc:
            raise self._disk_full() from exc
        self._stop_saver()  # no save behind the removal of the journal
        self.out.close()
        publish(self.part, self.target, force=self.force)
        remove_journal(self.journal_path)
        self.journal = None
        return self.target

    def _write(self, ext: Extent) -> None:
        assert self.out is not None
        if not self._dense:
            self.out.write_extent(ext)
            return
        chunks = [memoryview(ext.data)] if ext.data is not None else zero_chunks(ext.length)
        offset = ext.offset
        for chunk in chunks:
            self.out.write_dense(offset, chunk)
            offset += len(chunk)

    def _journal(self, ext: Extent) -> None:
        journal, out = self.journal, self.out
        assert journal is not None and out is not None
        data = memoryview(ext.data) if ext.data is not None else None
        pos, end, bs = ext.offset, ext.end, self.block_size
        while pos < end:
            block_end = min((pos // bs + 1) * bs, journal.identity.size)
            n = min(block_end, end) - pos
            self._hasher.add(None if data is None else data[pos - ext.offset :][:n], n)
            pos += n
            if pos == block_end:
                index = (block_end - 1) // bs
                self._pending.append(
                    (index, self._hasher.digest(block_end - index * bs), out.taken))
                self._promote()
                self._maybe_checkpoint()

    def _promote(self) -> None:
        """Journal the finished blocks whose bytes are in the file now (a direct write
        may still be staged: a block is journaled only once a kill cannot lose it)."""
        if not self._pending or self.out is None or self.journal is None:
            return
        landed = self.out.landed
        while self._pending and self._pending[0][2] <= landed:
            index, digest, _ = self._pending.popleft()
            self.journal.blocks[index] = digest
            self._dirty = True

    def _maybe_checkpoint(self) -> None:
        # A huge journal (a drive of many blocks) is saved less often: a second more per
        # 50 000 blocks (about 1.5 MB of JSON), so writing it stays a few percent of the
        # time.  By size, not by the measured save: that is mostly fsync, which a busy
        # disk makes slow for any journal.
        #
        # The save itself runs behind the stream (BackgroundSaver), and the writer does not
        # wait for staged bytes to land: when a checkpoint is due, the staged run is pushed
        # to the file, and the snapshot is taken at the first block finished once some
        # have landed (at once when they had).
        journal, out = self.journal, self.out
        assert journal is not None and out is not None
        interval = max(self.checkpoint_interval, len(journal.blocks) / 50_000)
        now = time.monotonic()
        if now - self._last_save >= interval:
            self._last_save, self._save_due = now, True
            if self._pending:
                out.push()
        if self._save_due and self._dirty:
            self._save_due = False
            if self._saver is None:
                path = self.journal_path
                self._saver = BackgroundSaver(lambda text: journal.write_snapshot(path, text))
            self._saver.submit(journal.snapshot())
            self._dirty = False

    def _stop_saver(self) -> None:
        """Let the saver write its last snapshot and stop; a failed save is not an error
        here (the journal is saved again, or removed, right after)."""
        if self._saver is not None:
            self._saver.close()
            self._saver = None

    def checkpoint(self) -> None:
        """Save the journal now, in this thread, if blocks finished since the last save
        (their staged bytes are written first: it journals every block finished before
        it)."""
        self._stop_saver()
        if self._pending and self.out is not None:
            self.out.flush()
        self._promote()
        if self._dirty and self.journal is not None:
            self.journal.save(self.journal_path)
            self._dirty = False
        self._last_save = time.monotonic()

    def _disk_full(self) -> DiskFull:
        """Free the unfinished block's bytes so the journal can be saved, save it, and say
        what is kept for the rerun."""
        journal, out = self.journal, self.out
        assert journal is not None and out is not None
        self._stop_saver()
        with contextlib.suppress(DrivepipeError):  # writes still staged fail the same way
            out.flush()
        self._promote()
        done = _prefix_blocks(journal)
        start = min(done * self.block_size, journal.identity.size)
        punch_hole(out.fd, start, journal.identity.size - start)
        saved = ""
        try:
            journal.save(self.journal_path)
            self._dirty = False
        except DrivepipeError as exc:
            saved = f" (the journal could not be saved: {exc.one_line()})"
        return DiskFull(
            f"{self.part}: no space left on device; {format_size(journal.done_bytes())} of "
            f"{format_size(journal.identity.size)} are kept{saved}: free space and run the "
            "same command again to go on from there"
        )

    # -- after --

    def abort(self) -> None:
        """Keep the ``.part`` and save the journal: the same command resumes."""
        self._report_kept()
        with contextlib.suppress(DrivepipeError):  # keep the original error
            if self.out is not None:
                self.out.flush()  # staged bytes into the file, so their blocks are kept
        with contextlib.suppress(DrivepipeError):
            self.checkpoint()
        self.close()

    def close(self) -> None:
        self._stop_saver()
        if self.out is not None:
            self.out.close()

    def discard(self) -> None:
        """Forget the ``.part`` and its journal (the source changed: start over)."""
        self.close()
        self.out = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.part)
        remove_journal(self.journal_path)
        self.kept_end = 0


def _prefix_blocks(journal: DownloadJournal) -> int:
    """How many blocks from the first one the journal holds without a gap."""
    count = 0
    while count in journal.blocks:
        count += 1
    return count
