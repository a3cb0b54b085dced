"""The library's words for a setting, and the flag the command line names instead.

Library messages do not name CLI flags ("resume into drive X explicitly", "a private
CA's certificate must be given"); every error line the CLI prints goes through
:func:`with_flags`, which puts the flag where the library said it in words.
"""

from __future__ import annotations

import re

FLAG_WORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"resume into drive ([0-9a-fA-F-]{36}) explicitly"), r"pass --resume \1"),
    (re.compile(r"give another journal path"), "pass another --journal"),
    (re.compile(r"a private CA's certificate must be given"),
     "pass the private CA's certificate with --cacert"),
    (re.compile(r"allow plain http explicitly"), "pass --insecure-http"),
    (re.compile(r"give an endpoint URL or a location code"),
     "pass --endpoint URL or --location CODE"),
    (re.compile(r"^no user: give one"), "no user: pass --user EMAIL"),
    (re.compile(r"give the user on its own"), "use --user"),
    (re.compile(r"^the location must be"), "--location must be"),
    (re.compile(r"read it as raw to send it as is"), "pass --format raw to send it as is"),
    (re.compile(r"a raw disk, read it as raw\)"), "a raw disk, pass --format raw)"),
    (re.compile(r"name the format chain (\S+)"), r"pass --format \1"),
    (re.compile(r"\(replace it explicitly\)"), "(use --force to replace it)"),
    (re.compile(r"pick the disk by its name or number"), "pick one with --disk NAME|N"),
    (re.compile(r"or give another state file"), "or pass another --state"),
    (re.compile(r"^the connections must"), "--connections must"),
    (re.compile(r"^the number of jobs must"), "--jobs must"),
    (re.compile(r"^the rate limit must"), "--limit-rate must"),
    (re.compile(r"^the Dask engine needs a scheduler address \(tcp://HOST:8786\)"),
     "--engine dask needs --scheduler tcp://HOST:8786"),
    (re.compile(r"^the Dask engine needs Dask"), "--engine dask needs Dask"),
    (re.compile(r"or serve another root directory"), "or serve another --root"),
    (re.compile(r"give an expected digest"), "pass --expect"),
)


def with_flags(message: str) -> str:
    """``message`` with the library's words for a setting replaced by the CLI's flags."""
    for pattern, flag in FLAG_WORDS:
        message = pattern.sub(flag, message)
    return message


__all__ = ["FLAG_WORDS", "with_flags"]
