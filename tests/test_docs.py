"""The docs stay true: the CLI reference is generated, links resolve, the example runs.

- ``docs/cli.md`` must equal what ``docs/gen_cli.py`` renders from the typer
  app now (a command or option changed without regenerating fails here);
- every relative link (and ``#anchor``) in ``docs/*.md`` and
  ``benchmarks/README.md`` points at a file (and heading) that exists;
- the example plugin of ``docs/architecture.md`` is found through the real
  entry-point discovery (``importlib.metadata`` reading a ``.dist-info`` put on
  ``sys.path``), and its format and stage work in real commands and pipelines.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import ModuleType

import pytest
import xxhash

from drivepipe import _registry
from drivepipe._runner import run_pipeline
from drivepipe.cli import main
from drivepipe_plugins.targets.discard import DiscardSink

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PLUGIN_DIR = DOCS / "example_plugin"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
MiB = 1 << 20


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_generated_from_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # gen_cli sets it too; restored after the test
    gen = load_module(DOCS / "gen_cli.py", "gen_cli")
    expected = gen.render()
    committed = (DOCS / "cli.md").read_text()
    assert committed == expected, "docs/cli.md is out of date: run python docs/gen_cli.py"
    for command in ("convert", "checksum", "inspect", "bench"):
        assert f"## drivepipe {command}" in committed


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, flags=re.M)}


def doc_files() -> list[Path]:
    return [*sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md"]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    if not doc.exists():
        pytest.skip(f"{doc.name} not written yet")
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = [t for t in LINK.findall(text) if not link_resolves(doc, t)]
    assert not broken, f"{doc.name}: broken links {broken}"


def link_resolves(doc: Path, target: str) -> bool:
    if re.match(r"^[a-z]+:", target):  # http:, https:, mailto: are not checked here
        return True
    file_part, _, anchor = target.partition("#")
    dest = (doc.parent / file_part).resolve() if file_part else doc
    if not dest.exists():
        return False
    return not anchor or dest.suffix != ".md" or anchor in anchors(dest)


def test_docs_exist() -> None:
    for name in ("guide.md", "cli.md", "architecture.md", "tuning.md"):
        assert (DOCS / name).is_file(), name


@pytest.fixture
def example_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The example plugin installed the way pip would leave it: module + dist-info."""
    dist = tmp_path / "drivepipe_example-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: drivepipe-example\nVersion: 0.0\n")
    # The entry points the example's pyproject.toml declares, as pip writes them.
    (dist / "entry_points.txt").write_text(
        "[drivepipe.formats]\nzrle = drivepipe_example:ZrleFormat\n\n"
        "[drivepipe.stages]\nzero_runs = drivepipe_example:ZeroRunsStage\n\n"
        "[drivepipe.targets]\nzrle = drivepipe_example:ZrleTarget\n")
    (tmp_path / "drivepipe_example.py").write_text(
        (PLUGIN_DIR / "drivepipe_example.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    caches = (_registry.formats, _registry.stages, _registry.targets)
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()
    sys.modules.pop("drivepipe_example", None)


def test_example_pyproject_declares_the_same_entry_points() -> None:
    text = (PLUGIN_DIR / "pyproject.toml").read_text()
    assert 'zrle = "drivepipe_example:ZrleFormat"' in text
    assert 'zero_runs = "drivepipe_example:ZeroRunsStage"' in text
    assert 'zrle = "drivepipe_example:ZrleTarget"' in text


@pytest.mark.usefixtures("example_plugin")
def test_example_target_is_discovered_and_writes_what_the_format_reads(tmp_path: Path) -> None:
    # a qcow2 made by qemu-img, converted into the plugin's own format by name, read
    # back by the plugin's format: the raw disk survives, and the zero runs cost nothing
    raw = tmp_path / "disk.raw"
    content = sparse_raw(raw)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    assert "zrle" in _registry.targets()
    out = tmp_path / "out.zrle"
    code, _, err = cli("convert", "--progress", "none", str(qcow2), f"zrle:{out}")
    assert code == 0, err
    assert out.read_bytes().startswith(b"ZRLE\x00\x01")
    assert out.stat().st_size < 1 * MiB  # 900 KB of data in an 8 MiB disk
    code, sums, err = cli("checksum", "--progress", "none", str(out))
    assert code == 0, err
    assert sums.split()[0] == xxhash.xxh3_128_hexdigest(content)
    # an existing output is refused by the plugin, and nothing is replaced
    before = out.read_bytes()
    code, _, err = cli("convert", "--progress", "none", str(qcow2), f"zrle:{out}")
    assert code != 0 and "already exists" in err and out.read_bytes() == before


@pytest.mark.usefixtures("example_plugin")
def test_example_target_leaves_nothing_when_the_image_is_corrupt(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    sparse_raw(raw)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    data = bytearray(qcow2.read_bytes())
    del data[len(data) // 2 :]  # clusters past the end: truncated
    qcow2.write_bytes(bytes(data))
    code, _, err = cli("convert", "--progress", "none", str(qcow2), f"zrle:{tmp_path / 'x.zrle'}")
    assert code != 0 and "Traceback" not in err
    assert not list(tmp_path.glob("x.zrle*"))


def sparse_raw(path: Path) -> bytes:
    rng = random.Random(5)
    data = bytearray(8 * MiB)
    for offset in (0, 3 * MiB + 123, 7 * MiB):
        data[offset : offset + 300_000] = rng.randbytes(300_000)
    path.write_bytes(bytes(data))
    return bytes(data)


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.usefixtures("example_plugin")
def test_example_format_is_discovered_and_works_in_commands(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    content = sparse_raw(raw)
    example = importlib.import_module("drivepipe_example")
    packed = tmp_path / "disk.zrle"
    example.write_zrle(str(raw), str(packed))

    assert "zrle" in _registry.formats()
    assert _registry.detect(str(packed)).name == "zrle"
    code, out, err = cli("checksum", "--progress", "none", str(packed))
    assert code == 0, err
    assert out.split()[0] == xxhash.xxh3_128_hexdigest(content)
    out_raw = tmp_path / "back.raw"
    code, _, err = cli("convert", "--progress", "none", str(packed), str(out_raw))
    assert code == 0, err
    assert out_raw.read_bytes() == content


@pytest.mark.usefixtures("example_plugin")
def test_example_stage_is_discovered_and_runs_in_a_pipeline(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    sparse_raw(raw)
    packed = tmp_path / "disk.zrle"
    importlib.import_module("drivepipe_example").write_zrle(str(raw), str(packed))
    stage = _registry.stages()["zero_runs"]()
    image = _registry.open_image(str(packed))
    total = run_pipeline(image.source, [*image.stages, stage], DiscardSink(), size=image.size)
    assert total == 8 * MiB
    # 8 one-MiB blocks, data in blocks 0, 3 and 7: the zero blocks 1-2 and 4-6 are two runs
    # of whole-MiB records (1, 2 and 4, 5, 6 -> five zero records, each a hole).
    assert stage.hole_bytes == 5 * MiB  # type: ignore[attr-defined]  # the example's counter
    assert stage.holes == 5  # type: ignore[attr-defined]


@pytest.mark.usefixtures("example_plugin")
def test_example_format_refuses_a_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zrle"
    bad.write_bytes(b"ZRLE\x00\x01" + (100).to_bytes(8, "big") + b"\x07" + bytes(8))
    code, _, err = cli("checksum", "--progress", "none", str(bad))
    assert code == 3 and "bad record" in err and "Traceback" not in err


def test_link_check_catches_missing_files_and_anchors(tmp_path: Path) -> None:
    doc = tmp_path / "a.md"
    doc.write_text("# Title Here\n\n## Second, part\n")
    (tmp_path / "b.md").write_text("x")
    assert link_resolves(doc, "b.md") and link_resolves(doc, "#second-part")
    assert link_resolves(doc, "a.md#title-here")
    assert not link_resolves(doc, "c.md")
    assert not link_resolves(doc, "#no-such-heading")
