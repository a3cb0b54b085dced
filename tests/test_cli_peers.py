"""The CLI behaves like its peers (coreutils, curl, xxh128sum) where users expect it to.

``-h`` everywhere, ``--version``, placeholders that say what goes there, missing
arguments named as the help names them, ``-q``/``-v``, one-line refusals of
options that make no sense, ``checksum`` carrying on past bad files and checking
``xxh128sum`` lists (``-c``, compared with the real ``xxh128sum -c``), and
``convert SRC DIR/``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import typer
import xxhash
from sparse_files import MakeImage

from drivepipe import __version__
from drivepipe._names import raw_name_for
from drivepipe.cli import load_commands, main

MiB = 1 << 20
XXH128SUM = shutil.which("xxh128sum")
needs_xxh128sum = pytest.mark.skipif(XXH128SUM is None, reason="xxh128sum not installed")


def cli(*args: str, stdin: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None,
        ) -> tuple[int, str, str]:
    if stdin is not None and monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str, *words: str) -> None:
    assert err.count("\n") == 1 and err.startswith("drivepipe: error: "), err
    for word in words:
        assert word in err, err


def command_paths() -> list[tuple[str, ...]]:
    """Every command and sub-command, as the words that run it."""
    group = typer.main.get_command(load_commands())
    ctx = typer.Context(group, info_name="drivepipe")
    found: list[tuple[str, ...]] = [()]
    for name in group.list_commands(ctx):  # type: ignore[attr-defined]  # a click Group
        cmd = group.get_command(ctx, name)  # type: ignore[attr-defined]
        found.append((name,))
        if hasattr(cmd, "list_commands"):
            sub_ctx = typer.Context(cmd, info_name=name, parent=ctx)
            found += [(name, sub) for sub in cmd.list_commands(sub_ctx)]
    return found


COMMANDS = command_paths()


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "drivepipe")
def test_dash_h_is_help_and_placeholders_say_what_goes_there(
        words: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, short, _ = cli(*words, "-h")
    assert code == 0 and short.startswith("Usage: drivepipe")
    assert cli(*words, "--help") == (0, short, "")
    usage = short.splitlines()[0]
    assert "{" not in usage and "<" not in usage, usage
    assert not re.search(r"<(str|int|float|text|integer)>", short), short
    if "--progress" in short:
        assert "--progress [auto|rich|plain|json|none]" in short


def test_the_commands_are_all_found() -> None:
    names = {" ".join(w) for w in COMMANDS}
    assert {"checksum", "convert", "upload", "download", "drives", "drives rm", "drives wait",
            "drives show", "drives uploads", "drives list", "serve"} <= names


def test_version() -> None:
    assert cli("--version") == (0, f"drivepipe {__version__}\n", "")


@pytest.mark.parametrize(("words", "name"), [
    (("checksum",), "PATH"), (("convert",), "SRC"), (("upload",), "IMAGE"),
    (("download",), "SOURCE"), (("drives", "rm"), "UUID"), (("drives", "wait"), "UUID"),
])
def test_missing_argument_is_named_as_the_help_names_it(
        words: tuple[str, ...], name: str) -> None:
    code, _, err = cli(*words)
    assert code == 2
    assert f"Missing argument '{name}'" in err
    usage = cli(*words, "-h")[1].splitlines()[0]
    assert re.search(rf" {name}(\.\.\.)?( |$)", usage), usage


# --- -q / -v --------------------------------------------------------------------------


def test_quiet_and_verbose(make_sparse: MakeImage) -> None:
    src = make_sparse(2 * MiB)
    digest = xxhash.xxh3_128_hexdigest(src.read_bytes())
    plain = cli("checksum", "--progress", "plain", str(src))
    assert plain[0] == 0 and plain[2]  # plain mode writes a summary
    assert cli("checksum", "-q", "--progress", "plain", str(src)) == (0, f"{digest}  {src}\n", "")
    # stderr is not a terminal here: auto shows nothing, -v shows the plain summary
    assert cli("checksum", str(src)) == (0, f"{digest}  {src}\n", "")
    code, out, err = cli("checksum", "-v", str(src))
    assert (code, out) == (0, f"{digest}  {src}\n")
    assert "checksum" in err and len(err.splitlines()) >= 2  # summary + one line per stage
    code, _, err = cli("checksum", "-q", "-v", str(src))
    assert code == 2
    one_error_line(err, "contradict")


# --- options that make no sense --------------------------------------------------------


@pytest.mark.parametrize(("args", "word"), [
    (("checksum", "--read-size", "0"), "--read-size must be at least 1 byte"),
    (("checksum", "--read-size", "-4M"), "not a size"),
    (("checksum", "--threads", "0"), "--threads must be at least 1"),
    (("checksum", "--queue-depth", "0"), "--queue-depth must be at least 1"),
    (("convert", "--read-size", "0"), "--read-size must be at least 1 byte"),
    (("convert", "--queue-depth", "-1"), "--queue-depth must be at least 1"),
    (("convert", "--threads", "0"), "--threads must be at least 1"),
])
def test_nonsense_options_are_refused_in_one_line(
        make_sparse: MakeImage, tmp_path: Path, args: tuple[str, ...], word: str) -> None:
    src = make_sparse(MiB)
    extra = [str(tmp_path / "out.raw")] if args[0] == "convert" else []
    code, out, err = cli(*args, str(src), *extra)
    assert code == 2 and out == ""
    one_error_line(err, word)
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize(("args", "word"), [
    (("serve", "--port", "70000"), "--port must be between 0 and 65535"),
    (("serve", "--idle-timeout", "0"), "--idle-timeout must be more than 0"),
    (("serve", "--min-size", "2G", "--max-size", "1G"), "is more than --max-size"),
    (("serve", "--max-size", "0"), "--max-size must be at least 1 byte"),
    (("download", "http://127.0.0.1:9/x", "--range-size", "0"), "--range-size must be at"),
    (("download", "http://127.0.0.1:9/x", "--connections", "0"), "--connections must be"),
    (("download", "http://127.0.0.1:9/x", "-q", "-v"), "contradict"),
    (("bench", "IMG", "--limit", "0"), "--limit must be at least 1 byte"),
    (("bench", "IMG", "--queue-depth", "0"), "--queue-depth must be at least 1"),
    (("drives", "wait", "12345678-1234-1234-1234-123456789abc", "--timeout", "-1"),
     "--timeout must be 0 or more"),
])
def test_nonsense_options_of_other_commands_are_refused_in_one_line(
        make_sparse: MakeImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        args: tuple[str, ...], word: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    img = str(make_sparse(MiB))
    code, out, err = cli(*[img if a == "IMG" else a for a in args])
    assert code == 2 and out == ""
    one_error_line(err, word)
    assert not (tmp_path / "store").exists()


# --- checksum of many files ------------------------------------------------------------


def test_checksum_carries_on_past_bad_files(make_sparse: MakeImage, tmp_path: Path) -> None:
    a, b = make_sparse(MiB, seed=1), make_sparse(2 * MiB, seed=2)
    missing = tmp_path / "nothere"
    code, out, err = cli("checksum", str(a), str(missing), str(tmp_path), str(b))
    assert code == 3
    assert out.splitlines() == [f"{xxhash.xxh3_128_hexdigest(a.read_bytes())}  {a}",
                                f"{xxhash.xxh3_128_hexdigest(b.read_bytes())}  {b}"]
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("drivepipe: error: ") for line in lines)
    assert "nothere" in lines[0] and "is a directory" in lines[1]


def write_list(tmp_path: Path, *paths: Path) -> Path:
    """The list ``xxh128sum`` itself writes for ``paths`` (or the same lines, without it)."""
    listing = tmp_path / "SUMS"
    if XXH128SUM:
        text = subprocess.run([XXH128SUM, *map(str, paths)], capture_output=True, text=True,
                              check=True).stdout
    else:
        text = "".join(f"{xxhash.xxh3_128_hexdigest(p.read_bytes())}  {p}\n" for p in paths)
    listing.write_text(text)
    return listing


def test_check_list_all_ok(make_sparse: MakeImage, tmp_path: Path) -> None:
    a, b = make_sparse(MiB, seed=1), make_sparse(3 * MiB, seed=2)
    listing = write_list(tmp_path, a, b)
    assert cli("checksum", "-c", str(listing)) == (0, f"{a}: OK\n{b}: OK\n", "")
    assert cli("checksum", "--check", str(listing))[0] == 0


def test_check_list_reports_mismatches_and_unreadable_files(
        make_sparse: MakeImage, tmp_path: Path) -> None:
    a, b, c = (make_sparse(MiB, seed=s) for s in (1, 2, 3))
    listing = write_list(tmp_path, a, b, c)
    with open(b, "r+b") as f:  # one byte changed
        f.seek(1000)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")
    c.unlink()
    with open(listing, "a") as f:
        f.write("this is not a checksum line\n")
    code, out, err = cli("checksum", "-c", str(listing))
    assert code == 7  # the first failure's: b's mismatch (c's unreadable file would be 3)
    assert out.splitlines() == [f"{a}: OK", f"{b}: FAILED", f"{c}: FAILED open or read"]
    lines = err.splitlines()
    assert lines[0].startswith("drivepipe: error: ") and str(c.name) in lines[0]
    assert "1 line(s) improperly formatted" in err and "1 computed checksum(s) did NOT" in err
    # a mismatch alone exits 7, like a failed verification anywhere else
    listing.write_text(f"{'0' * 32}  {a}\n")
    assert cli("checksum", "-c", str(listing)) == (7, f"{a}: FAILED\n", "drivepipe: warning: "
                                                    "1 computed checksum(s) did NOT match\n")


@needs_xxh128sum
def test_check_list_agrees_with_xxh128sum(make_sparse: MakeImage, tmp_path: Path) -> None:
    assert XXH128SUM is not None
    a, b = make_sparse(MiB, seed=4), make_sparse(MiB, seed=5)
    listing = write_list(tmp_path, a, b)
    b.write_bytes(b.read_bytes()[:-1] + b"x")
    theirs = subprocess.run([XXH128SUM, "-c", str(listing)], capture_output=True, text=True,
                            check=False)
    code, ours, _ = cli("checksum", "-c", str(listing))
    # the same NAME: OK / NAME: FAILED lines (its warnings go to stdout, ours to stderr)
    assert ours.splitlines() == [line for line in theirs.stdout.splitlines() if ": " in line]
    assert ours.splitlines()[1].endswith(": FAILED")
    assert (code != 0) == (theirs.returncode != 0)


def test_check_list_from_stdin_bsd_lines_and_binary_marks(
        make_sparse: MakeImage, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_sparse(MiB, seed=6), make_sparse(MiB, seed=7)
    da, db = (xxhash.xxh3_128_hexdigest(p.read_bytes()) for p in (a, b))
    text = f"XXH128 ({a}) = {da}\n\n{db.upper()} *{b}\n"
    assert cli("checksum", "-c", "-", stdin=text, monkeypatch=monkeypatch) == (
        0, f"{a}: OK\n{b}: OK\n", "")


def test_check_list_that_is_not_a_list(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    code, out, err = cli("checksum", "-c", str(junk), str(tmp_path / "absent"))
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert "no properly formatted checksum lines" in lines[0]
    assert "absent" in lines[1] and "cannot read" in lines[1]


# --- convert SRC DIR/ ------------------------------------------------------------------


def test_output_name_rule() -> None:
    assert raw_name_for("/srv/disk.qcow2.gz") == "disk.raw"
    assert raw_name_for("web.IMG.xz") == "web.raw"
    assert raw_name_for("disk.raw") == "disk.raw"
    assert raw_name_for("backup.2024") == "backup.2024.raw"
    assert raw_name_for("a.b.zst") == "a.b.raw"
    assert raw_name_for(".qcow2") == "image.raw"
    assert raw_name_for("-") == "image.raw"


def test_convert_into_a_directory(make_sparse: MakeImage, tmp_path: Path) -> None:
    src = make_sparse(2 * MiB, seed=3)
    named = tmp_path / "vm.img"
    os.rename(src, named)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for target in (str(out_dir), f"{out_dir}/"):
        assert cli("convert", "--force", str(named), target) == (0, "", "")
        assert (out_dir / "vm.raw").read_bytes() == named.read_bytes()
    assert os.listdir(out_dir) == ["vm.raw"]
    # without --force the file inside is not replaced
    code, _, err = cli("convert", str(named), str(out_dir))
    assert code == 5
    one_error_line(err, "vm.raw")
    # a trailing slash names a directory: one that does not exist is an error, not a file
    code, _, err = cli("convert", str(named), f"{tmp_path}/absent/")
    assert code != 0 and "Traceback" not in err
    assert not (tmp_path / "absent").exists()
