"""Endpoint and credential resolution: options, env, config file, netrc, prompt.

Real files in a temporary HOME; nothing is mocked but the environment mapping.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from drivepipe._errors import ConfigError
from drivepipe.cloudsigma.config import (
    Credentials,
    Endpoint,
    InsecureConfigWarning,
    config_path,
    load_config,
    normalize_base,
    resolve_credentials,
    resolve_endpoint,
)

SECRET = "s3cr#t-Pa55"
EP = Endpoint("https://api.example.test/api/2.0/", "https://direct.example.test/api/2.0/")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME so ~/.netrc and ~/.cloudsigma.conf are ours."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("CLOUDSIGMA_USERNAME", "CLOUDSIGMA_PASSWORD", "CLOUDSIGMA_CONFIG",
                "DRIVEPIPE_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return home


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# --- endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("https://zrh.cloudsigma.com/api/2.0/", "https://zrh.cloudsigma.com/api/2.0/"),
        ("https://zrh.cloudsigma.com/api/2.0", "https://zrh.cloudsigma.com/api/2.0/"),
        ("https://zrh.cloudsigma.com", "https://zrh.cloudsigma.com/api/2.0/"),
        ("  http://127.0.0.1:8080/  ", "http://127.0.0.1:8080/api/2.0/"),
    ],
)
def test_normalize_base(given: str, base: str) -> None:
    assert normalize_base(given) == base


@pytest.mark.parametrize("bad", ["ftp://h/api/2.0/", "zrh.cloudsigma.com", "https:///api/2.0/"])
def test_normalize_base_refuses_non_http(bad: str) -> None:
    with pytest.raises(ConfigError, match="http"):
        normalize_base(bad)


@pytest.mark.parametrize("url", [f"https://me:{SECRET}@h/api/2.0/", f"ftp://me:{SECRET}@h/"])
def test_endpoint_with_credentials_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        normalize_base(url)
    assert SECRET not in str(info.value)
    assert "credentials" in str(info.value)


def test_endpoint_option_wins_over_env_and_config(home: Path) -> None:
    ep = resolve_endpoint("https://a.test", env={"DRIVEPIPE_ENDPOINT": "https://b.test"},
                          config={"api_endpoint": "https://c.test"})
    assert ep.api == ep.direct == "https://a.test/api/2.0/"
    assert not ep.direct_guessed


def test_endpoint_from_env_then_config(home: Path) -> None:
    env_ep = resolve_endpoint(env={"DRIVEPIPE_ENDPOINT": "https://b.test/api/2.0"},
                              config={"api_endpoint": "https://c.test"})
    assert env_ep.api == "https://b.test/api/2.0/"
    conf_ep = resolve_endpoint(env={}, config={"api_endpoint": "https://c.test"})
    assert conf_ep.api == "https://c.test/api/2.0/"


def test_location_guesses_direct_host_until_resolved(home: Path) -> None:
    ep = resolve_endpoint(location="ZRH", env={}, config={})
    assert ep.api == "https://zrh.cloudsigma.com/api/2.0/"
    assert ep.direct == "https://direct.zrh.cloudsigma.com/api/2.0/"
    assert ep.direct_guessed
    explicit = resolve_endpoint(location="zrh", direct_endpoint="https://d.test", env={},
                                config={})
    assert explicit.direct == "https://d.test/api/2.0/"
    assert not explicit.direct_guessed


@pytest.mark.parametrize("code", ["../etc", "zrh.evil.com", ""])
def test_location_code_must_be_a_code(home: Path, code: str) -> None:
    with pytest.raises(ConfigError):
        resolve_endpoint(location=code or " ", env={}, config={})


def test_no_endpoint_at_all(home: Path) -> None:
    with pytest.raises(ConfigError, match="no endpoint"):
        resolve_endpoint(env={}, config={})


def test_endpoint_owns_only_its_origins() -> None:
    assert EP.owns("https://api.example.test/api/2.0/drives/")
    assert EP.owns("https://direct.example.test:443/api/2.0/drives/upload/")
    assert not EP.owns("http://api.example.test/api/2.0/")  # other scheme
    assert not EP.owns("https://api.example.test:8443/")  # other port
    assert not EP.owns("https://evil.test/api.example.test/")


# --- the config file -----------------------------------------------------------------------


def test_config_file_parsing_quotes_and_comments(tmp_path: Path) -> None:
    conf = write_private(tmp_path / "cs.conf", "\n".join([
        "# pycloudsigma settings",
        "; another comment style",
        "[ignored section header]",
        "api_endpoint = https://zrh.cloudsigma.com/api/2.0/   # trailing comment",
        'username="me@example.com"',
        f"password = '{SECRET}'  # quoted: the # inside is kept",
        "ws_endpoint =",
        "not a key value line",
        "",
    ]))
    values = load_config(str(conf))
    assert values == {
        "api_endpoint": "https://zrh.cloudsigma.com/api/2.0/",
        "username": "me@example.com",
        "password": SECRET,
        "ws_endpoint": "",
    }


def test_unquoted_hash_starts_a_comment_like_configobj(tmp_path: Path) -> None:
    conf = write_private(tmp_path / "cs.conf", "password = abc#def\nusername = u # me\n")
    assert load_config(str(conf)) == {"password": "abc", "username": "u"}


def test_missing_config_is_empty(tmp_path: Path) -> None:
    assert load_config(str(tmp_path / "none.conf")) == {}


def test_unreadable_config_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path))  # a directory


def test_config_path_from_env_or_home(home: Path) -> None:
    assert config_path({}) == str(home / ".cloudsigma.conf")
    assert config_path({"CLOUDSIGMA_CONFIG": "/x/y.conf"}) == "/x/y.conf"


def test_cloudsigma_config_env_points_at_the_file(home: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_private(home / ".cloudsigma.conf", "api_endpoint = https://wrong.test\n")
    conf = write_private(tmp_path / "other.conf",
                         f"api_endpoint = https://right.test\nusername = me\npassword = {SECRET}\n")
    monkeypatch.setenv("CLOUDSIGMA_CONFIG", str(conf))
    ep = resolve_endpoint()
    assert ep.api == "https://right.test/api/2.0/"
    creds = resolve_credentials(ep, prompt=False)
    assert (creds.username, creds.password) == ("me", "s3cr")  # unquoted: '#' comments


def test_default_config_in_home(home: Path) -> None:
    write_private(home / ".cloudsigma.conf",
                  f"api_endpoint = https://home.test\nusername = me\npassword = '{SECRET}'\n")
    ep = resolve_endpoint()
    assert ep.api == "https://home.test/api/2.0/"
    assert resolve_credentials(ep, prompt=False).password == SECRET


def test_world_readable_config_with_password_warns(tmp_path: Path) -> None:
    conf = tmp_path / "cs.conf"
    conf.write_text(f"username = me\npassword = '{SECRET}'\n")
    conf.chmod(0o644)
    with pytest.warns(InsecureConfigWarning, match="chmod 600") as record:
        load_config(str(conf))
    assert all(SECRET not in str(w.message) for w in record)


def test_private_config_or_no_password_does_not_warn(tmp_path: Path) -> None:
    private = write_private(tmp_path / "a.conf", f"password = '{SECRET}'\n")
    public = tmp_path / "b.conf"
    public.write_text("username = me\n")
    public.chmod(0o644)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(str(private))
        load_config(str(public))


# --- credentials ---------------------------------------------------------------------------


def test_env_credentials_win(home: Path) -> None:
    env = {"CLOUDSIGMA_USERNAME": "env-user", "CLOUDSIGMA_PASSWORD": SECRET}
    creds = resolve_credentials(EP, env=env, config={"username": "c", "password": "p"},
                                prompt=False)
    assert (creds.username, creds.password) == ("env-user", SECRET)


def test_user_option_with_env_password(home: Path) -> None:
    creds = resolve_credentials(EP, "opt@example.com", env={"CLOUDSIGMA_PASSWORD": SECRET},
                                config={}, prompt=False)
    assert (creds.username, creds.password) == ("opt@example.com", SECRET)


def test_config_password_only_for_its_own_user(home: Path) -> None:
    config = {"username": "alice", "password": SECRET}
    assert resolve_credentials(EP, env={}, config=config, prompt=False).password == SECRET
    with pytest.raises(ConfigError, match="no password for bob") as info:
        resolve_credentials(EP, "bob", env={}, config=config, prompt=False)
    assert SECRET not in str(info.value)


def test_netrc_in_home(home: Path) -> None:
    write_private(home / ".netrc",
                  f"machine other.test login x password y\n"
                  f"machine api.example.test login net@example.com password {SECRET}\n")
    creds = resolve_credentials(EP, env={}, config={}, prompt=False)
    assert (creds.username, creds.password) == ("net@example.com", SECRET)
    # --user naming another account does not get the netrc password
    with pytest.raises(ConfigError, match="no password"):
        resolve_credentials(EP, "someone@else", env={}, config={}, prompt=False)


def test_broken_netrc_is_one_line_without_its_tokens(home: Path) -> None:
    # The keyword "password" forgotten: the parser chokes on the password itself.
    write_private(home / ".netrc", f"machine api.example.test login me {SECRET}\n")
    with pytest.raises(ConfigError, match="netrc") as info:
        resolve_credentials(EP, env={}, config={}, prompt=False)
    assert SECRET not in str(info.value)


def test_no_user_anywhere(home: Path) -> None:
    with pytest.raises(ConfigError, match="no user"):
        resolve_credentials(EP, env={}, config={}, prompt=False)


def test_prompt_refused_when_stdin_is_not_a_tty(home: Path) -> None:
    # prompt=None decides by sys.stdin.isatty(); under pytest stdin is not a terminal.
    with pytest.raises(ConfigError, match="no password for me") as info:
        resolve_credentials(EP, "me", env={}, config={})
    assert "terminal" in str(info.value)


def test_password_never_in_repr_str_or_format() -> None:
    creds = Credentials("me@example.com", SECRET)
    for text in (repr(creds), str(creds), f"{creds}", f"{creds!r}", repr([creds]),
                 repr({"c": creds})):
        assert SECRET not in text
        assert "me@example.com" in text


def test_no_cli_option_takes_a_password() -> None:
    from typer.main import get_command  # noqa: PLC0415 - the whole CLI, for inspection

    from drivepipe.cli import app  # noqa: PLC0415

    commands = get_command(app).commands  # type: ignore[attr-defined]  # a TyperGroup
    assert "upload" in commands
    for name, command in commands.items():
        for param in command.params:
            names = " ".join([*getattr(param, "opts", []), param.name or ""]).lower()
            assert "pass" not in names, f"{name} has an option {names!r}"
