"""What a download learns about a remote file, and as whom it asks.

:class:`ProbeResult` is what the first request of a download (``Range:
bytes=0-0``, redirects followed) taught us: the final (often signed) URL, the
exact size, whether ranges work, the validators (ETag, Last-Modified) and the
name the server proposes.  :class:`Auth` is the endpoint whose origin may get
the credentials (and only it: never a redirect target elsewhere).  Both live in
the engine so that the download job, the names module and the download source
plugin share them without the engine importing a plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.resume.download_journal import SourceIdentity


@dataclass(frozen=True)
class Auth:
    """Who we are towards ``endpoint``; credentials go only to its origin."""

    endpoint: Endpoint | None = None
    creds: Credentials | None = None


@dataclass(frozen=True)
class ProbeResult:
    """What the first request taught us about the source."""

    url: str
    final_url: str
    redirected: bool
    size: int
    ranges: bool
    etag: str | None
    last_modified: str | None
    disposition: str | None

    def identity(self, source: str) -> SourceIdentity:
        return SourceIdentity(source, self.size, self.etag, self.last_modified)

    @property
    def strong_etag(self) -> str | None:
        """The ETag if ``If-Range`` may use it (weak validators may not)."""
        return self.etag if self.etag and not self.etag.startswith("W/") else None
