"""Where to send bytes and as whom: endpoints and credentials.

Endpoint, in order: ``--endpoint``, ``--location CODE``, ``DRIVEPIPE_ENDPOINT``,
``api_endpoint`` of pycloudsigma's config file (``~/.cloudsigma.conf`` or the
path in ``CLOUDSIGMA_CONFIG``).  The direct (upload/download) host is
``--direct-endpoint``, else the location's ``upload_url`` (resolved later
through ``GET /locations/``), else the API endpoint itself.

Credentials: the user from ``--user``, ``CLOUDSIGMA_USERNAME``, the config file
or ``~/.netrc``; the password from ``CLOUDSIGMA_PASSWORD``, the config file,
``~/.netrc`` or a prompt on a terminal - never from argv.  A password never
appears in a repr, a log line, or an error message, and is bound to the hosts
of the configured endpoints (see :meth:`Endpoint.owns`).
"""

from __future__ import annotations

import getpass
import ipaddress
import netrc
import os
import stat
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from drivepipe._errors import ConfigError

API_SUFFIX = "/api/2.0/"
DEFAULT_CONFIG = "~/.cloudsigma.conf"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


class InsecureConfigWarning(UserWarning):
    """A file holding a password is readable by other users."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"

    def __str__(self) -> str:
        return self.username


def normalize_base(url: str, what: str = "endpoint") -> str:
    """``https://h/api/2.0`` or ``https://h`` -> ``https://h/api/2.0/``; checks the scheme."""
    url = url.strip()
    if "@" in url:
        # Checked on the whole text before parsing: a password holding '#' or '/' would
        # otherwise move into the fragment or path, and the messages below echo the URL.
        raise ConfigError(f"{what} must not contain credentials; give the user on its own, "
                          "and the password in CLOUDSIGMA_PASSWORD or the config file")
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ConfigError(f"{what} must be an http(s) URL such as https://zrh.cloudsigma.com"
                          f"/api/2.0/, got {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{what} must not have a query or fragment, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/api/2.0"):
        path = path + "/api/2.0"
    return f"{parts.scheme}://{parts.netloc}{path}/"


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``url``, the unit credentials are bound to."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def is_loopback(url: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1).

    Decided on the parsed address, not the text: ``127.0.0.1.example.com`` or
    ``127.evil.net`` are names anyone can point anywhere.
    """
    host = (urlsplit(url).hostname or "").lower()
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoint:
    """The API base and the direct (bytes) base, both ending in ``/api/2.0/``."""

    api: str
    direct: str
    location: str | None = None
    #: the direct base was guessed, not configured (resolve through /locations/)
    direct_guessed: bool = False

    def owns(self, url: str) -> bool:
        """True if credentials configured for this endpoint may be sent to ``url``."""
        return origin(url) in (origin(self.api), origin(self.direct))

    def with_direct(self, direct: str) -> Endpoint:
        return Endpoint(self.api, normalize_base(direct, "direct endpoint"), self.location)


_CONFIG_CACHE: dict[tuple[str, int, int, int, int], dict[str, str]] = {}


def config_path(env: Mapping[str, str]) -> str:
    return os.path.expanduser(env.get("CLOUDSIGMA_CONFIG") or DEFAULT_CONFIG)


def load_config(path: str) -> dict[str, str]:
    """Read a ConfigObj-style ``key = value`` file; missing file -> empty dict.

    A command asks for the endpoint and the credentials separately; the file is
    read (and its permissions warned about) once per version of the file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    key = (path, st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)
    if key not in _CONFIG_CACHE:
        _CONFIG_CACHE[key] = _read_config(path)
    return dict(_CONFIG_CACHE[key])


def _read_config(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[_config_value(key)] = _config_value(value)
    if values.get("password") and mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(
            f"{path} holds a password and is readable by other users; chmod 600 it",
            InsecureConfigWarning, stacklevel=2,
        )
    return values


def _config_value(text: str) -> str:
    """A ConfigObj scalar: ``"quoted # kept"`` or ``unquoted # comment dropped``.

    Same reading as pycloudsigma's ConfigObj, so a file that works there gives
    the same password here: in an unquoted value ``#`` starts a comment.
    """
    text = text.strip()
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        if end > 0:
            return text[1:end]
    return text.partition("#")[0].strip()


def resolve_endpoint(
    endpoint: str | None = None,
    direct_endpoint: str | None = None,
    location: str | None = None,
    env: Mapping[str, str] | None = None,
    config: Mapping[str, str] | None = None,
) -> Endpoint:
    """Pick the API and direct bases from options, environment and config file."""
    env = os.environ if env is None else env
    config = load_config(config_path(env)) if config is None else config
    guessed = False
    if endpoint:
        api = normalize_base(endpoint)
    elif location:
        code = location.strip().lower()
        if not code.isalnum():
            raise ConfigError(f"the location must be a location code such as zrh, got "
                              f"{location!r}")
        api = f"https://{code}.cloudsigma.com{API_SUFFIX}"
        guessed = direct_endpoint is None
    elif env.get("DRIVEPIPE_ENDPOINT"):
        api = normalize_base(env["DRIVEPIPE_ENDPOINT"], "DRIVEPIPE_ENDPOINT")
    elif config.get("api_endpoint"):
        api = normalize_base(config["api_endpoint"], "api_endpoint in the config file")
    else:
        raise ConfigError("no endpoint: give an endpoint URL or a location code, set "
                          "DRIVEPIPE_ENDPOINT, or set api_endpoint in ~/.cloudsigma.conf")
    if direct_endpoint:
        direct = normalize_base(direct_endpoint, "direct endpoint")
    elif location:
        direct = f"https://direct.{location.strip().lower()}.cloudsigma.com{API_SUFFIX}"
    else:
        direct = api
    return Endpoint(api, direct, location, guessed)


def _netrc_entry(host: str) -> tuple[str, str] | None:
    try:
        auth = netrc.netrc().authenticators(host)
    except FileNotFoundError:
        return None
    except netrc.NetrcParseError as exc:
        # The parser quotes the offending token, which may be a password: drop it.
        reason = exc.msg.split("'")[0].strip() or "cannot parse"
        raise ConfigError(f"~/.netrc line {exc.lineno}: {reason}") from None
    except OSError as exc:
        raise ConfigError(f"~/.netrc: cannot read: {exc.strerror}") from exc
    if auth is None:
        return None
    login, _, password = auth
    return (login, password) if password else None


def resolve_credentials(
    endpoint: Endpoint,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    config: Mapping[str, str] | None = None,
    *,
    prompt: bool | None = None,
) -> Credentials:
    """Find the user and password; ConfigError when there is none."""
    env = os.environ if env is None else env
    config = load_config(config_path(env)) if config is None else config
    host = urlsplit(endpoint.api).hostname or ""
    username = user or env.get("CLOUDSIGMA_USERNAME") or config.get("username")
    net = _netrc_entry(host)
    if not username and net:
        username = net[0]
    if not username:
        raise ConfigError("no user: give one, set CLOUDSIGMA_USERNAME, or add "
                          "username to ~/.cloudsigma.conf")
    password = env.get("CLOUDSIGMA_PASSWORD")
    if not password and config.get("password") and config.get("username", username) == username:
        password = config["password"]
    if not password and net and net[0] == username:
        password = net[1]
    if not password:
        interactive = sys.stdin.isatty() if prompt is None else prompt
        if not interactive:
            raise ConfigError(f"no password for {username}: set CLOUDSIGMA_PASSWORD, add it "
                              "to ~/.cloudsigma.conf or ~/.netrc, or run on a terminal")
        password = getpass.getpass(f"Password for {username} at {host}: ")
    return Credentials(username, password)
