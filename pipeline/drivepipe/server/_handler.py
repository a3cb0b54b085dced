"""The router: request line in, one view called (or a JSON error) out.

Paths live under ``/api/2.0/`` (extra leading slashes and a missing trailing
slash are tolerated).  Every route but the signed ``direct/`` links needs
Basic credentials.  Faults (see ``_faults``) apply to every route but the
admin ``_faults/`` one.  With ``Expect: 100-continue`` the checks that need
no body (route, faults, credentials, length, signature, chunk state) run
before ``100 Continue``, so a refused upload never sends its body.  HEAD is
answered wherever GET is.  Unknown paths: 404; known path, other method: 405
with ``Allow``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from drivepipe.server._api import ApiViews
from drivepipe.server._errors import ApiError, notexist
from drivepipe.server._http import ClientGone
from drivepipe.server._transfer import TransferViews

_HEX: Final = "[0-9a-fA-F]"
_UUID: Final = f"(?P<uuid>{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}})"
API_PREFIX: Final = "api/2.0/"


@dataclass(frozen=True, slots=True)
class Route:
    pattern: re.Pattern[str]
    #: HTTP method -> view method name.
    views: dict[str, str]
    auth: bool = True
    #: View method name that checks a streamed body's request before reading it.
    precheck: str = ""


def _route(path: str, views: dict[str, str], *, auth: bool = True, precheck: str = "") -> Route:
    return Route(re.compile(path + "/?"), views, auth, precheck)


ROUTES: Final = (
    _route(r"drives/upload(?:/.*)?", {"POST": "direct_upload"}, precheck="upload_length"),
    _route(r"drives", {"GET": "list_drives"}),
    _route(r"drives/detail", {"GET": "list_drives_detail"}),
    _route(rf"drives/{_UUID}", {"GET": "get_drive", "PUT": "put_drive", "DELETE": "delete_drive"}),
    _route(rf"drives/{_UUID}/download", {"GET": "download_redirect"}),
    _route(rf"drives/{_UUID}/action", {"POST": "drive_action"}),
    _route(r"initupload", {"POST": "init_upload"}),
    _route(r"capabilities", {"GET": "capabilities"}),
    _route(r"locations", {"GET": "locations"}),
    _route(r"_faults", {"GET": "get_faults", "POST": "post_faults", "DELETE": "delete_faults"}),
    _route(rf"direct/{_UUID}/download", {"GET": "signed_download"}, auth=False),
    _route(
        rf"direct/{_UUID}/chunk/(?P<number>\d{{1,12}})", {"POST": "chunk_body"},
        auth=False, precheck="chunk_length",
    ),
)


class StoreHandler(ApiViews, TransferViews):
    """One connection of the store server; each request goes through :meth:`dispatch`."""

    _faults_done: bool

    def parse_request(self) -> bool:
        self._faults_done = False
        return super().parse_request()

    def do_GET(self) -> None:  # noqa: N802  # the stdlib's dispatch names
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET  # noqa: N815

    def find_route(self) -> tuple[Route, Callable[..., None], dict[str, str]]:
        path = self.path_only.lstrip("/")
        if not path.startswith(API_PREFIX):
            raise notexist(f"no resource at {self.path_only} (the API lives under /api/2.0/)")
        rest = path[len(API_PREFIX) :]
        for route in ROUTES:
            m = route.pattern.fullmatch(rest)
            if m is None:
                continue
            method = "GET" if self.command == "HEAD" else self.command
            name = route.views.get(method)
            if name is None:
                allowed = {*route.views, "HEAD"} if "GET" in route.views else set(route.views)
                allow = ", ".join(sorted(allowed))
                raise ApiError(
                    405, "validation", f"{self.command} is not allowed here (allowed: {allow})",
                    headers=(("Allow", allow),),
                )
            return route, getattr(self, name), m.groupdict()
        raise notexist(f"no resource at {self.path_only}")

    def apply_faults(self, route: Route) -> None:
        if self._faults_done or route.views.get("GET") == "get_faults":
            return
        self._faults_done = True
        faults = self.ctx.faults
        delay = faults.take("delay", self.command, self.path)
        if delay is not None:
            time.sleep(delay.seconds)
        failure = faults.take("status", self.command, self.path)
        if failure is not None:
            retry = () if failure.retry_after is None else (
                ("Retry-After", str(failure.retry_after)),)
            raise ApiError(
                failure.status, "backend", "fault injection: try again later", headers=retry
            )

    def admit(self) -> tuple[Route, Callable[..., None], dict[str, str]]:
        """Everything checked before the body: route, faults, credentials, prechecks."""
        route, view, params = self.find_route()
        self.apply_faults(route)
        if route.auth:
            self.check_auth()
        if route.precheck:
            getattr(self, route.precheck)(**params)
        return route, view, params

    def handle_expect_100(self) -> bool:
        self.request_facts()
        try:
            self.admit()
        except ApiError as err:
            self.reply_error(err)
            return False
        return super().handle_expect_100()

    def dispatch(self) -> None:
        try:
            _, view, params = self.admit()
            view(**params)
        except ApiError as err:
            self.reply_error(err)
        except (ClientGone, ConnectionError, TimeoutError):
            self.close_connection = True
