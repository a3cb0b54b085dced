"""The download resume journal and the checks built on it, on real files."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from drivepipe._verify import (
    FileDigester,
    PrefixHasher,
    blocks_with_data,
    check_kept_blocks,
    describe_blocks,
    digest_file,
    expectation_from_meta,
    parse_expect,
)
from drivepipe.resume.download_journal import (
    DownloadJournal,
    SourceIdentity,
    block_digest,
    load_journal,
    parse_journal,
    remove_journal,
    source_key,
)
from drivepipe_plugins.sources.receiver import backoff_delay, missing_spans, retry_after

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


def test_missing_spans_group_and_cut_runs() -> None:
    journal = DownloadJournal(SourceIdentity("u", 10 * MiB), MiB, {2: "0" * 16, 3: "0" * 16})
    spans = [(s.first, s.last) for s in missing_spans(journal, 3)]
    assert spans == [(0, 2), (4, 7), (7, 10)]
    journal.blocks = {i: "0" * 16 for i in range(10)}
    assert missing_spans(journal, 3) == []


def test_check_kept_blocks_finds_a_flipped_byte(make_sparse: MakeImage) -> None:
    image = make_sparse(8 * MiB, seed=3, pieces=12)
    data = image.read_bytes()
    journal = DownloadJournal(SourceIdentity("u", len(data)), MiB)
    for i in range(8):
        journal.blocks[i] = block_digest(data[i * MiB : (i + 1) * MiB])
    assert check_kept_blocks(str(image), journal) == []
    with open(image, "r+b") as f:
        f.seek(6 * MiB + 1)
        f.write(bytes([data[6 * MiB + 1] ^ 1]))
    assert check_kept_blocks(str(image), journal) == [6]
    assert describe_blocks(journal, [6, 1, 2]) == \
        f"bytes {MiB}-{3 * MiB - 1}, {6 * MiB}-{7 * MiB - 1}"


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


def test_prefix_hasher_follows_blocks_finished_out_of_order(make_sparse: MakeImage) -> None:
    image = make_sparse(9 * MiB + 333, seed=5, pieces=10)
    data = image.read_bytes()
    journal = DownloadJournal(SourceIdentity("u", len(data)), MiB)
    prefix = len(data) - 1000
    hasher = PrefixHasher(str(image), journal, FileDigester(len(data), prefix))
    hasher.start()
    order = list(range(journal.block_count))
    random.Random(1).shuffle(order)
    for index in order:
        time.sleep(0.002)
        journal.blocks[index] = "0" * 16
        hasher.wake()
    got = hasher.finish()
    assert got is not None
    assert got.whole == xxhash.xxh3_128_hexdigest(data)
    assert got.prefix == xxhash.xxh3_128_hexdigest(data[:prefix])
    tail = data[prefix:]
    assert got.nonzero_tail_at == (None if not any(tail) else
                                   prefix + len(tail) - len(tail.lstrip(b"\0")))
    assert got == digest_file(str(image), prefix)


def test_prefix_hasher_stops_without_all_blocks(make_sparse: MakeImage) -> None:
    image = make_sparse(3 * MiB, seed=6, pieces=3)
    journal = DownloadJournal(SourceIdentity("u", 3 * MiB), MiB, {0: "0" * 16})
    hasher = PrefixHasher(str(image), journal, FileDigester(3 * MiB))
    hasher.start()
    hasher.stop()
    assert hasher.next_block <= 1
    assert hasher.finish() is None


def test_blocks_with_data_sees_only_blocks_overlapping_data(tmp_path: Path) -> None:
    path = tmp_path / "p"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        for offset in (MiB - 4096, 5 * MiB + 8192):  # end of block 0, inside block 5
            f.seek(offset)
            f.write(b"x" * 4096)
    journal = DownloadJournal(SourceIdentity("u", 8 * MiB), MiB)
    assert blocks_with_data(str(path), journal, range(8)) == {0, 5}
    assert blocks_with_data(str(path), journal, [1, 2, 3, 4, 6, 7]) == set()


def test_kept_prefix_is_hashed_once_and_the_hasher_continues(make_sparse: MakeImage) -> None:
    image = make_sparse(6 * MiB, seed=7, pieces=8)
    data = image.read_bytes()
    journal = DownloadJournal(SourceIdentity("u", len(data)), MiB)
    for i in (0, 1, 2, 4):  # 3 missing: the prefix is blocks 0-2
        journal.blocks[i] = block_digest(data[i * MiB : (i + 1) * MiB])
    journal.blocks[1] = "f" * 16  # ... but block 1 went bad on disk
    digester = FileDigester(len(data))
    assert check_kept_blocks(str(image), journal, digester=digester) == [1]
    assert digester.pos == MiB  # only block 0 was good and contiguous
    del journal.blocks[1]
    hasher = PrefixHasher(str(image), journal, digester)
    assert hasher.next_block == 1
    hasher.start()
    for i in (1, 3, 5):
        journal.blocks[i] = "0" * 16
        hasher.wake()
    got = hasher.finish()
    assert got is not None and got.whole == xxhash.xxh3_128_hexdigest(data)


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    rng = random.Random(3)
    for attempt in range(8):
        delay = backoff_delay(attempt, 0.5, 30.0, rng)
        assert 0.5 * min(30.0, 0.5 * 2**attempt) <= delay <= min(30.0, 0.5 * 2**attempt)
    assert retry_after({"retry-after": "7"}, 30.0) == 7.0
    assert retry_after({"retry-after": "999"}, 30.0) == 30.0
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 30.0) == 0.0
    assert retry_after({}, 30.0) == 0.0
