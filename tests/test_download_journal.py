"""The download resume journal, the kept-prefix check of the resumable file target, the
verify stage and the in-order pieces of the download source, on real files."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from drivepipe._errors import UsageError, VerifyError
from drivepipe._extent import Extent
from drivepipe._remote import ProbeResult
from drivepipe._verify import (
    Expectation,
    digest_file,
    expectation_from_meta,
    parse_expect,
)
from drivepipe.jobs.download import DownloadOptions, _receive_options
from drivepipe.resume.download_journal import (
    DownloadJournal,
    SourceIdentity,
    block_digest,
    load_journal,
    parse_journal,
    remove_journal,
    source_key,
)
from drivepipe.transport.curl import TlsOptions
from drivepipe_plugins.sources.download import (
    AUTO_RANGE_MAX,
    AUTO_RANGE_MIN,
    PIECE,
    RangeReceiver,
    ReceiveOptions,
    _Range,
    range_step,
)
from drivepipe_plugins.stages.verify import VerifyStage
from drivepipe_plugins.targets.resumable_file import ResumableFileWriter

MiB = 1 << 20
#: the ``make_sparse`` fixture of tests/conftest.py (not imported: ``conftest`` is
#: ambiguous when tests/with_server is collected in the same run)
MakeImage = Callable[..., Path]
IDENTITY = SourceIdentity("http://h/x", 10 * MiB + 5, '"abc"', None)


def journal_with(blocks: dict[int, str]) -> DownloadJournal:
    return DownloadJournal(IDENTITY, MiB, dict(blocks))


def test_save_and_load_round_trip_leaves_no_temporary(tmp_path: Path) -> None:
    path = str(tmp_path / "x.part.journal")
    journal = journal_with({0: "0" * 16, 10: "a" * 16})
    journal.save(path)
    assert os.listdir(tmp_path) == ["x.part.journal"]
    loaded = load_journal(path)
    assert loaded == journal
    assert loaded is not None and loaded.block_count == 11
    assert loaded.block_span(10) == (10 * MiB, 5)
    assert loaded.done_bytes() == MiB + 5
    remove_journal(path)
    assert load_journal(path) is None


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(version=99),
    lambda d: d["blocks"].update({"11": "0" * 16}),   # past the end
    lambda d: d["blocks"].update({"-1": "0" * 16}),
    lambda d: d["blocks"].update({"1": "xyz"}),       # not a digest
    lambda d: d.update(block_size=0),
    lambda d: d["identity"].update(size="lots"),
    lambda d: d.pop("identity"),
    lambda d: d.update(blocks=[1, 2]),
])
def test_inconsistent_journals_are_refused(mutate: object) -> None:
    data = journal_with({0: "0" * 16}).as_dict()
    assert parse_journal(json.loads(json.dumps(data))) is not None
    assert callable(mutate)
    mutate(data)
    assert parse_journal(data) is None


def test_garbage_file_is_no_journal(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(b"{\"version\": 1, \"identity\"")
    assert load_journal(str(path)) is None


def test_identity_must_match_exactly() -> None:
    journal = journal_with({})
    assert journal.matches(IDENTITY, MiB)
    assert not journal.matches(IDENTITY, 2 * MiB)
    assert not journal.matches(SourceIdentity("http://h/x", IDENTITY.size, '"abd"'), MiB)
    assert not journal.matches(SourceIdentity("http://h/x", IDENTITY.size + 1, '"abc"'), MiB)
    assert not journal.matches(SourceIdentity("http://h/y", IDENTITY.size, '"abc"'), MiB)


def test_source_key_hides_query_secrets_but_tells_queries_apart() -> None:
    a = source_key("https://user@h:8443/d/x/?part=1&token2=SECRET")
    b = source_key("https://h:8443/d/x/?part=1&token2=OTHER")
    assert "SECRET" not in a and "user" not in a
    assert a.startswith("https://h:8443/d/x/?sha256=")
    assert a != b
    assert source_key("http://h/a") == "http://h/a"


def test_a_fresh_signed_link_to_the_same_object_has_the_same_key() -> None:
    old = source_key("https://h/direct/u/download/?expires=100&sig=AAA")
    new = source_key("https://h/direct/u/download/?sig=BBB&expires=200")
    assert old == new == "https://h/direct/u/download/"
    s3 = "https://b.s3/k?X-Amz-Date=1&X-Amz-Signature=abc&versionId=7"
    assert source_key(s3) == source_key(s3.replace("abc", "def").replace("=1", "=2"))
    assert source_key(s3) != source_key(s3.replace("versionId=7", "versionId=8"))


def test_digest_file_matches_xxh128sum_prefix_and_tail(make_sparse: MakeImage,
                                                       tmp_path: Path) -> None:
    image = make_sparse(6 * MiB + 7, seed=4, pieces=6)
    data = image.read_bytes()
    got = digest_file(str(image))
    assert got.whole == xxhash.xxh3_128_hexdigest(data)
    if shutil.which("xxh128sum"):
        line = subprocess.run(["xxh128sum", str(image)], capture_output=True, text=True,
                              check=True).stdout
        assert line.split()[0] == got.whole
    last = len(data.rstrip(b"\0"))
    cut = digest_file(str(image), prefix=last - 1)
    assert cut.prefix == xxhash.xxh3_128_hexdigest(data[: last - 1])
    assert cut.nonzero_tail_at == last - 1
    whole_prefix = digest_file(str(image), prefix=last)
    assert whole_prefix.nonzero_tail_at is None
    assert whole_prefix.prefix == xxhash.xxh3_128_hexdigest(data[:last])


def test_expectations() -> None:
    assert parse_expect("xxh128:" + "AB" * 16).digest == "ab" * 16
    # the bare digest xxh128sum prints is accepted as it is
    assert parse_expect("CD" * 16).digest == "cd" * 16
    assert parse_expect("  " + "ef" * 16 + "\n").digest == "ef" * 16
    for bad in ("sha256:00", "ab" * 15, "ab" * 17, "xxh128:" + "zz" * 16, "md5:" + "ab" * 16):
        with pytest.raises(Exception, match="32 hex digits"):
            parse_expect(bad)
    meta = {"drivepipe_xxh128": "cd" * 16, "drivepipe_size": "100"}
    found = expectation_from_meta(meta, 1000)
    assert found is not None and found.length == 100 and found.digest == "cd" * 16
    assert expectation_from_meta({**meta, "drivepipe_size": "1001"}, 1000) is None
    assert expectation_from_meta({**meta, "drivepipe_xxh128": "zz"}, 1000) is None


def stream_of(data: bytes, piece: int = 300_000) -> list[Extent]:
    """``data`` as in-order extents, all-zero pieces as holes."""
    out = []
    for pos in range(0, len(data), piece):
        chunk = data[pos : pos + piece]
        out.append(Extent.hole(pos, len(chunk)) if not any(chunk) else Extent(pos, len(chunk),
                                                                                chunk))
    return out


def write_part(target: Path, data: bytes, identity: SourceIdentity, block: int = MiB
               ) -> ResumableFileWriter:
    """A resumable file written from ``data`` but not published (kept as after a kill)."""
    writer = ResumableFileWriter(str(target), block_size=block)
    writer.open(identity)
    assert list(writer.kept()) == []
    for ext in stream_of(data):
        writer._write(ext)
        writer._journal(ext)
    writer.abort()
    return writer


def test_journal_digests_of_the_stream_match_the_bytes(make_sparse: MakeImage,
                                                       tmp_path: Path) -> None:
    data = make_sparse(5 * MiB + 777, seed=5, pieces=6).read_bytes()
    identity = SourceIdentity("u", len(data), '"e"')
    write_part(tmp_path / "d.img", data, identity)
    journal = load_journal(str(tmp_path / "d.img.part.journal"))
    assert journal is not None and sorted(journal.blocks) == list(range(6))
    for i in range(6):
        assert journal.blocks[i] == block_digest(data[i * MiB : (i + 1) * MiB])
    assert (tmp_path / "d.img.part").read_bytes() == data


def test_kept_prefix_stops_at_a_damaged_block_and_frees_the_rest(
    make_sparse: MakeImage, tmp_path: Path
) -> None:
    data = make_sparse(6 * MiB, seed=7, pieces=8).read_bytes()
    identity = SourceIdentity("u", len(data), '"e"')
    write_part(tmp_path / "k.img", data, identity)
    part = tmp_path / "k.img.part"
    with open(part, "r+b") as f:  # block 3 goes bad on disk
        f.seek(3 * MiB + 10)
        f.write(b"\xff")
    notes: list[str] = []
    writer = ResumableFileWriter(str(tmp_path / "k.img"), block_size=MiB, notify=notes.append)
    assert writer.open(identity) == 6 * MiB  # offered; checked as it is read
    kept = b"".join(bytes(e.data) if e.data is not None else bytes(e.length)
                    for e in writer.kept())
    assert kept == data[: 3 * MiB] and writer.kept_end == 3 * MiB
    assert "block 3" in notes[-1] and "3.0 MiB of 6.0 MiB kept" in notes[-1]
    assert writer.journal is not None and sorted(writer.journal.blocks) == [0, 1, 2]
    # everything after the good prefix reads as zeros now (old bytes punched out)
    assert not any(part.read_bytes()[3 * MiB :])
    writer.close()


def test_a_journal_of_another_source_or_without_validators_starts_over(
    tmp_path: Path
) -> None:
    data = random.Random(1).randbytes(2 * MiB)
    identity = SourceIdentity("u", len(data), '"e"')
    write_part(tmp_path / "o.img", data, identity)
    notes: list[str] = []
    writer = ResumableFileWriter(str(tmp_path / "o.img"), block_size=MiB, notify=notes.append)
    assert writer.open(identity, resumable=False) == 0
    assert "no ETag or Last-Modified" in notes[0] and "starting over" in notes[1]
    assert not any((tmp_path / "o.img.part").read_bytes())
    writer.close()
    other = SourceIdentity("u", len(data), '"f"')
    write_part(tmp_path / "p.img", data, identity)
    writer = ResumableFileWriter(str(tmp_path / "p.img"), block_size=MiB)
    assert writer.open(other) == 0
    writer.close()


@pytest.mark.parametrize("length", [None, 3 * MiB])
def test_verify_stage_passes_extents_and_checks_at_the_end(length: int | None) -> None:
    data = random.Random(2).randbytes(3 * MiB) + bytes(MiB)
    want = xxhash.xxh3_128_hexdigest(data[:length] if length else data)
    stage = VerifyStage(len(data), Expectation(want, length, "the test"))
    out = list(stage.process(iter(stream_of(data))))
    assert [e.offset for e in out] == [e.offset for e in stream_of(data)]
    assert stage.digest is not None and stage.digest.whole == xxhash.xxh3_128_hexdigest(data)
    bad = VerifyStage(len(data), Expectation("0" * 32, length, "the test"))
    passed = []
    with pytest.raises(VerifyError, match="does not match"):
        for ext in bad.process(iter(stream_of(data))):
            passed.append(ext)
    assert len(passed) == len(out)  # raised after the last extent, before the end


def test_verify_stage_catches_a_nonzero_byte_past_the_expected_length() -> None:
    data = random.Random(3).randbytes(MiB) + bytes(100) + b"\x01" + bytes(99)
    stage = VerifyStage(len(data), Expectation(xxhash.xxh3_128_hexdigest(data[:MiB]), MiB))
    with pytest.raises(VerifyError, match=f"byte {MiB + 100} is not zero"):
        list(stage.process(iter(stream_of(data))))


def test_range_pieces_are_aligned_fresh_buffers_and_continue_after_a_retry() -> None:
    data = random.Random(4).randbytes(3 * PIECE + 5000)
    start = PIECE // 2
    r = _Range(start, len(data))
    r.take(memoryview(data[start : start + 70_000]))
    r.take(memoryview(data[start + 70_000 : 2 * PIECE + 3]))  # a retry continues at pos
    r.take(memoryview(data[2 * PIECE + 3 :]))
    assert r.received and r.buf is None
    pieces = list(r.pieces)
    assert [p.offset for p in pieces] == [start, PIECE, 2 * PIECE, 3 * PIECE]
    assert b"".join(bytes(p.data or b"") for p in pieces) == data[start:]
    assert len({id(p.data) for p in pieces}) == len(pieces)


def test_many_connections_get_smaller_ranges_not_a_bigger_window() -> None:
    receiver = RangeReceiver("http://h/x", tls=TlsOptions(),
                             options=ReceiveOptions(connections=64, range_size=8 * MiB))
    receiver.size, receiver.ranges = 1 << 30, True
    receiver._grow_window()
    window = sum(r.end - r.pos for r in receiver.window)
    assert len(receiver.window) == 66 and window <= 112 * MiB
    few = RangeReceiver("http://h/x", tls=TlsOptions(),
                        options=ReceiveOptions(connections=8, range_size=8 * MiB))
    few.size, few.ranges = 1 << 30, True
    few._grow_window()
    assert [r.end - r.pos for r in few.window] == [8 * MiB] * 10


def test_the_automatic_range_size_splits_the_bytes_over_the_connections() -> None:
    def step(remaining: int, connections: int) -> int:
        return range_step(remaining, ReceiveOptions(connections=connections))

    # a small file: every connection gets a share, none below the floor
    assert step(64 * MiB, 4) == 16 * MiB
    assert step(16 * MiB, 8) == AUTO_RANGE_MIN == 4 * MiB
    assert step(1, 1) == AUTO_RANGE_MIN
    # shares are whole pieces (the receiver's buffers are aligned to them)
    assert step(64 * MiB + 1, 4) == 17 * MiB
    # a big file: the cap, then the window's share of 112 MiB over connections + 2
    assert step(100 << 30, 1) == 37 * MiB  # 112 MiB / 3, whole pieces: below the cap
    assert step(100 << 30, 2) == 28 * MiB
    assert step(1 << 30, 4) == 18 * MiB
    assert step(1 << 30, 8) == 11 * MiB
    assert step(100 << 30, 64) == 1 * MiB  # many connections: smaller ranges, same window
    assert range_step(1 << 30, ReceiveOptions(connections=1, window_bytes=1 << 30)) \
        == AUTO_RANGE_MAX == 64 * MiB
    # given: kept, within the window's share
    assert range_step(1 << 30, ReceiveOptions(connections=4, range_size=3 * MiB)) == 3 * MiB
    assert range_step(1 << 30, ReceiveOptions(connections=4, range_size=1 << 30)) == 18 * MiB
    assert range_step(1 << 30, ReceiveOptions(connections=200, range_size=1 << 30)) == PIECE


def test_a_resumed_download_splits_only_what_is_left() -> None:
    size = 1 << 30
    probed = ProbeResult("http://h/x", "http://h/x", False, size, True, '"e"', None, None)
    receiver = RangeReceiver("http://h/x", tls=TlsOptions(), probed=probed,
                             start=size - 32 * MiB, options=ReceiveOptions(connections=4))
    receiver._plan()
    receiver._grow_window()
    assert [(r.pos, r.end - r.pos) for r in receiver.window] == [
        (size - 32 * MiB + k * 8 * MiB, 8 * MiB) for k in range(4)]
    fresh = RangeReceiver("http://h/x", tls=TlsOptions(), probed=probed,
                          options=ReceiveOptions(connections=4))
    fresh._plan()
    fresh._grow_window()
    assert [r.end - r.pos for r in fresh.window] == [18 * MiB] * 6


def test_the_download_options_leave_the_range_size_to_the_source() -> None:
    assert DownloadOptions().range_size is None
    assert _receive_options(DownloadOptions()).range_size is None
    assert _receive_options(DownloadOptions(range_size=MiB)).range_size == MiB
    DownloadOptions().check()
    with pytest.raises(UsageError, match="at least 1 byte"):
        DownloadOptions(range_size=0).check()
