"""The CLI's option groups: declared once as dataclasses, expanded into typer options."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from drivepipe._errors import UsageError
from drivepipe.cli._common import FROM_OPTIONS, ImageOptions, ProgressOptions, grouped_options
from drivepipe.cli._net import Account


def make_app(seen: list[tuple[str, Account, ProgressOptions, int]]) -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.command()
    @grouped_options
    def cmd(name: str, account: Account = FROM_OPTIONS,
            progress: ProgressOptions = FROM_OPTIONS, last: int = 1) -> None:
        seen.append((name, account, progress, last))

    return app


def test_groups_become_options_and_come_back_as_dataclasses() -> None:
    seen: list[tuple[str, Account, ProgressOptions, int]] = []
    result = CliRunner().invoke(make_app(seen), [
        "disk", "--endpoint", "https://e/api/2.0/", "--user", "u@example.com",
        "--insecure-http", "-q", "--last", "2"])
    assert result.exit_code == 0, result.output
    assert seen == [("disk", Account(endpoint="https://e/api/2.0/", user="u@example.com",
                                     insecure_http=True), ProgressOptions(quiet=True), 2)]
    assert seen[0][1].given() and seen[0][2].mode == "none"


def test_defaults_are_the_groups_defaults() -> None:
    seen: list[tuple[str, Account, ProgressOptions, int]] = []
    result = CliRunner().invoke(make_app(seen), ["disk"])
    assert result.exit_code == 0, result.output
    assert seen == [("disk", Account(), ProgressOptions(), 1)]
    assert not seen[0][1].given()


def test_help_lists_the_group_options_in_the_parameter_place() -> None:
    result = CliRunner().invoke(make_app([]), ["--help"], env={"COLUMNS": "200"})
    flags = [word for word in result.output.split() if word.startswith("--")]
    assert flags == ["--endpoint", "--direct-endpoint", "--location", "--user", "--cacert",
                     "--insecure-http", "--progress", "--quiet", "--verbose", "--last",
                     "--help"]


def test_a_command_without_a_group_is_a_mistake() -> None:
    with pytest.raises(TypeError, match="no option group"):
        grouped_options(lambda name: None)


LOCAL = ImageOptions(read_size="16M", queue_depth=4)


def test_a_group_instance_gives_the_command_its_own_defaults() -> None:
    seen: list[ImageOptions] = []
    app = typer.Typer(add_completion=False)

    @app.command()
    @grouped_options
    def cmd(image: ImageOptions = LOCAL) -> None:
        seen.append(image)

    runner = CliRunner()
    assert runner.invoke(app, []).exit_code == 0
    assert runner.invoke(app, ["--threads", "3", "-f", "qcow2"]).exit_code == 0
    assert seen == [LOCAL, ImageOptions(fmt="qcow2", read_size="16M", queue_depth=4, threads=3)]
    read = seen[1].read()
    assert (read.format, read.read_size, read.threads) == ("qcow2", 16 << 20, 3)


@pytest.mark.parametrize(("options", "flag"), [
    (ImageOptions(queue_depth=0), "--queue-depth"),
    (ImageOptions(threads=0), "--threads"),
    (ImageOptions(read_size="0"), "--read-size"),
])
def test_image_options_are_checked_with_their_flags_names(options: ImageOptions,
                                                          flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        options.read()
