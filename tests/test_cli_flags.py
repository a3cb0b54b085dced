"""Library messages say a setting in words; the CLI's error line names its flag."""

from __future__ import annotations

import pytest

from drivepipe._errors import ConfigError
from drivepipe.cli._flags import with_flags
from drivepipe.cloudsigma.config import normalize_base, resolve_credentials, resolve_endpoint

UUID = "3bd0c2a4-4c3b-4f6e-9a71-0d6f1e2a7b55"


@pytest.mark.parametrize(("words", "flag"), [
    (f"image changed; or resume into drive {UUID} explicitly to continue", f"--resume {UUID}"),
    ("cannot connect: TLS certificate not trusted (a private CA's certificate must be given)",
     "--cacert"),
    ("refusing to send the password over plain http to h; use https, or allow plain http "
     "explicitly if you really mean it", "--insecure-http"),
    ("another drivepipe upload is using j; wait for it, or give another journal path",
     "--journal"),
])
def test_words_become_flags(words: str, flag: str) -> None:
    assert flag in with_flags(words) and "--" not in words


def test_config_messages_name_no_flag_in_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    messages = []
    for call in (lambda: resolve_endpoint(None, None, None, env={}, config={}),
                 lambda: resolve_endpoint(None, None, "z-1", env={}, config={}),
                 lambda: normalize_base("https://me:pw@h/api/2.0/")):
        with pytest.raises(ConfigError) as err:
            call()
        messages.append(err.value.one_line())
    ep = resolve_endpoint("https://h.example/api/2.0/", None, None, env={}, config={})
    with pytest.raises(ConfigError) as err:
        resolve_credentials(ep, None, env={}, config={}, prompt=False)
    messages.append(err.value.one_line())
    assert all("--" not in m for m in messages), messages
    flagged = [with_flags(m) for m in messages]
    assert "--endpoint URL or --location CODE" in flagged[0]
    assert flagged[1].startswith("--location must be")
    assert "--user" in flagged[2] and "--user EMAIL" in flagged[3]
