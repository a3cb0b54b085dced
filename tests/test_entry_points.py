"""The light entry-point scan finds what importlib.metadata finds, or hands over to it."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from drivepipe import _entry_points
from drivepipe._registry import FORMATS_GROUP, SOURCES_GROUP, STAGES_GROUP, TARGETS_GROUP

GROUPS = (FORMATS_GROUP, STAGES_GROUP, SOURCES_GROUP, TARGETS_GROUP, "console_scripts")


def by_importlib(group: str) -> list[tuple[str, str]]:
    return [(ep.name, ep.value) for ep in importlib.metadata.entry_points(group=group)]


def by_scan(group: str) -> list[tuple[str, str]]:
    found = _entry_points.declared([group])[group]
    return [(ep.name, ep.value) for ep in found]


def dist_info(where: Path, name: str, text: str) -> None:
    meta = where / f"{name}-1.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (meta / "entry_points.txt").write_text(text)


@pytest.fixture
def fresh_caches() -> None:
    importlib.invalidate_caches()


def by_path_scan(group: str) -> list[tuple[str, str]]:
    found = _entry_points._scan({group})
    assert found is not None
    return [(ep.name, ep.value) for ep in found.get(group, [])]


def test_a_plain_process_takes_the_light_scan() -> None:
    # in a process of its own: the test run's own import hooks do not count
    code = "from drivepipe import _entry_points as e; print(e._plain_path())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "True"


def test_the_installed_groups_are_what_importlib_metadata_declares() -> None:
    for group in GROUPS:
        assert sorted(by_path_scan(group)) == sorted(by_importlib(group)), group
        assert sorted(by_scan(group)) == sorted(by_importlib(group)), group
    assert ("raw", "drivepipe_plugins.formats.raw:RawFormat") in by_scan(FORMATS_GROUP)


@pytest.mark.usefixtures("fresh_caches")
def test_the_first_distribution_of_a_name_wins_and_comments_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    dist_info(first, "Demo.Plugin", "# a comment\n[drivepipe.formats]\n  # indented\n"
              "demo = demo_mod:Fmt\n\n[other]\nx = y:z\n")
    dist_info(second, "demo_plugin", "[drivepipe.formats]\nshadowed = demo_mod:Other\n")
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))
    assert "demo" in dict(by_importlib(FORMATS_GROUP))
    assert "shadowed" not in dict(by_importlib(FORMATS_GROUP))
    assert sorted(by_path_scan(FORMATS_GROUP)) == sorted(by_importlib(FORMATS_GROUP))


@pytest.mark.usefixtures("fresh_caches")
def test_a_zip_on_the_path_is_left_to_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "plugins.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zipped-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: zipped\n")
        z.writestr("zipped-1.0.dist-info/entry_points.txt",
                   "[drivepipe.stages]\nzipped = zipped_mod:Stage\n")
    monkeypatch.syspath_prepend(str(archive))
    assert _entry_points._scan({STAGES_GROUP}) is None
    assert ("zipped", "zipped_mod:Stage") in by_scan(STAGES_GROUP)


def test_a_finder_of_distributions_is_left_to_importlib_metadata(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    class Finder:
        @staticmethod
        def find_spec(*args: object) -> None:
            return None

        @staticmethod
        def find_distributions(*args: object) -> list[object]:
            return []

    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, Finder()])
    assert not _entry_points._plain_path()


def test_load_follows_the_attribute_path_and_refuses_a_malformed_value() -> None:
    ep = _entry_points.EntryPoint("p", "os.path:join", "g")
    assert ep.load() is importlib.import_module("os.path").join
    assert _entry_points.EntryPoint("m", "os.path", "g").load() is importlib.import_module(
        "os.path")
    with pytest.raises(ValueError, match="malformed"):
        _entry_points.EntryPoint("bad", "not a value!", "g").load()
