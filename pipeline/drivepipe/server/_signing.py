"""Signed, expiring links: a capability in the URL instead of credentials.

A link is a path plus ``expires`` (unix seconds) and ``sig``, an HMAC-SHA256
over the purpose, the path parameters and the expiry, keyed with the store's
secret.  The secret lives in ``<root>/secret`` (mode 0600, made once), so links
handed out before a restart stay valid after it.  Refused: a missing, tampered
or expired signature (the caller answers 403).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time

SECRET_BYTES = 32


def load_secret(path: str) -> bytes:
    """The secret at ``path``, created (atomically, 0600) when absent."""
    with contextlib.suppress(FileNotFoundError):
        with open(path, "rb") as f:
            data = f.read()
        if len(data) >= SECRET_BYTES:
            return data
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(SECRET_BYTES))
        f.flush()
        os.fsync(f.fileno())
    try:
        # link() keeps the first secret if two servers race on a new root.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path, "rb") as f:
        return f.read()


class Signer:
    """Makes and checks ``sig`` values for (purpose, parts, expires)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def sign(self, purpose: str, parts: tuple[str, ...], expires: int) -> str:
        message = "\n".join((purpose, *parts, str(expires))).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def query(self, purpose: str, parts: tuple[str, ...], ttl: float) -> str:
        """``expires=..&sig=..`` for a link valid ``ttl`` seconds from now."""
        expires = int(time.time() + ttl)
        return f"expires={expires}&sig={self.sign(purpose, parts, expires)}"

    def check(self, purpose: str, parts: tuple[str, ...], expires: str, sig: str) -> str | None:
        """None when valid, else why not (for the 403 message)."""
        if not expires.isdigit() or not sig:
            return "the link is not signed"
        expected = self.sign(purpose, parts, int(expires))
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            return "the link's signature is not valid"
        if int(expires) < time.time():
            return "the link has expired"
        return None
