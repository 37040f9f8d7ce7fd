"""The secrets a job holds, and the scrubbing of every text a server sent before it is written.

A job holds secrets in four places: the environment variables its plugins read
(``secret_env``: an ``api_key_env``'s key, Label Studio's token), the user-info of a
URL (``http://user:password@host``), and any value under a params key that names a
secret (``api_key``, ``token``, ``password``..., ``extra_body`` included). A server
may send any of them back — a successful answer, an error body, an answer that
failed a schema, a judge's reasoning — so every such text is searched for them
before it reaches ``generations/``, ``errors/``, ``scores/``, a journal, a log
record, the terminal or Prefect:

- a candidate whose text holds one is not written to ``generations/`` (it would be
  training data): it becomes an ``errors/`` row that says which secret was removed;
- everywhere else (error texts, a judge's ``details``, log records) the secret is
  blanked to ``***``.

A secret counts from its first :data:`MIN_PREFIX` characters past a vendor's prefix on
(``sk-proj-`` or ``sk-ant-api03-`` are shared by every key of a kind and identify none;
``sk-proj-abcd1234`` does, so a server that cuts a key there still shows too much); a
value shorter than
:data:`MIN_SECRET` is not searched for in free text, where it would blank ordinary
words. A text is first searched for each secret's first characters with ``in`` (a text
that holds none, nearly every one, costs that alone): 100k candidates of 650 characters
take 0.27 s against 7 secrets' spellings, about what building their Arrow table takes.

The scrubber of a job is installed process-wide (:func:`install`): a log record factory
scrubs every record the process makes, whichever logger or handler (Prefect's API
handler included) it goes to, and the stages scrub their rows with
:func:`genflow.data.results.scrub_result`. A job's secrets are gathered from its config by
:func:`genflow.config.job_secrets`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

MASK = "***"
MIN_PREFIX = 8
"""A secret's characters past its vendor prefix that identify it: any longer prefix of it is blanked."""
VENDOR_PREFIX = re.compile(r"(?:[A-Za-z0-9]{1,10}[-_])+")
"""``sk-``, ``sk-proj-``, ``ghp_``, ``xoxb-``: the dash- or underscore-ended words a key starts with."""
VENDOR_PREFIX_CHARS = 16
"""At most this much of a key's start counts as its vendor's prefix."""


def identifying_head(value: str) -> str:
    """The shortest prefix of a secret that identifies it: a vendor's prefix (``sk-proj-``, at most
    :data:`VENDOR_PREFIX_CHARS`) and :data:`MIN_PREFIX` characters more. An answer that only
    mentions ``sk-proj-`` is not a leak and stays training data; nor is one that names the user
    of a URL's ``user:password``."""
    user = re.match(r"[^\s:@/]{1,64}:(?=.)", value)  # ``user:password``: the user names no secret
    start = user.end() if user else 0
    vendor = start
    for match in re.finditer(r"[-_]", value[start:start + VENDOR_PREFIX_CHARS]):
        if VENDOR_PREFIX.fullmatch(value[start:start + match.end()]):
            vendor = start + match.end()
    return value[:vendor + MIN_PREFIX]
MIN_SECRET = 6
"""Values shorter than this are not searched for in texts (``admin`` would blank words)."""


@dataclass(frozen=True)
class Secret:
    """A secret value and where the job holds it (``$OPENAI_API_KEY``, ``generators.0.params.base_url's
    password``): a message names the place, never the value."""

    value: str
    where: str


class Scrubber:
    """Finds and blanks a set of secrets, and any prefix of one that identifies it (:func:`identifying_head`)."""

    def __init__(self, secrets: Iterable[Secret] = ()) -> None:
        self.secrets: dict[str, Secret] = {}
        for secret in secrets:
            for value in _spellings(secret.value):
                if len(value) >= MIN_SECRET and value not in self.secrets:
                    self.secrets[value] = Secret(value, secret.where)
        self._by_head: dict[str, list[str]] = {}
        for value in self.secrets:
            self._by_head.setdefault(identifying_head(value), []).append(value)
        heads = sorted(self._by_head, key=len, reverse=True)
        self._heads = tuple(heads)
        self._pattern = re.compile("|".join(map(re.escape, heads))) if heads else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def merged(self, other: Scrubber) -> Scrubber:
        return Scrubber([*self.secrets.values(), *other.secrets.values()])

    def _matches(self, text: str) -> Iterator[tuple[int, int, Secret]]:
        """(start, end, secret) of each secret or prefix of one in ``text``, left to right."""
        assert self._pattern is not None
        match = self._pattern.search(text)
        while match is not None:
            start, head = match.start(), match.group()
            end, found = start, None
            for value in self._by_head[head]:  # the longest run of the text that follows a secret
                n = len(head)
                while n < len(value) and start + n < len(text) and text[start + n] == value[n]:
                    n += 1
                if found is None or start + n > end:
                    end, found = start + n, self.secrets[value]
            assert found is not None
            yield start, end, found
            match = self._pattern.search(text, end)

    def holds(self, text: str) -> bool:
        """Whether ``text`` holds a secret's first characters: ``in`` per secret, 3x faster than the
        regex on a text that holds none (nearly every text)."""
        return any(head in text for head in self._heads)

    def find(self, text: str | None) -> Secret | None:
        """The first secret ``text`` holds (None for none)."""
        if not text or not self.holds(text):
            return None
        for _, _, secret in self._matches(text):
            return secret
        return None

    def scrub(self, text: str) -> str:
        """``text`` with every secret and prefix of one replaced by ``***``; the same object when it holds none."""
        if not text or not self.holds(text):
            return text
        parts, pos = [], 0
        for start, end, _ in self._matches(text):
            parts += [text[pos:start], MASK]
            pos = end
        parts.append(text[pos:])
        return "".join(parts)

    def scrub_data(self, data: Any) -> Any:
        """JSON-able data with every string scrubbed (keys too); the same object when it holds no secret."""
        if self._pattern is None:
            return data
        if isinstance(data, str):
            return self.scrub(data)
        if isinstance(data, Mapping):
            try:
                if not self.holds(json.dumps(data, default=str, ensure_ascii=False)):
                    return data
            except (TypeError, ValueError):  # keys JSON cannot write: look at each value
                pass
            return {self.scrub(str(k)): self.scrub_data(v) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            return [self.scrub_data(v) for v in data]
        return data


def _spellings(value: str) -> list[str]:
    """A secret as a server may send it back: as it is, URL-encoded, or escaped in a JSON string."""
    value = value.strip()
    out = [value]
    for spelled in (quote(value, safe=""), unquote(value), json.dumps(value)[1:-1]):
        if spelled not in out:
            out.append(spelled)
    return out


# -- secret names and URLs -----------------------------------------------------------------------

SECRET_KEY_ENDINGS = ("secret", "password", "passwd", "token", "api_key", "apikey", "api-key", "access_key",
                      "secret_key", "private_key", "credential", "credentials", "authorization", "auth", "cookie")


def is_secret_key(key: str) -> bool:
    """``aws_secret_access_key``, ``session_token``, ``api_key``, ``X-Api-Key``, ``Authorization``...
    but not ``max_new_tokens``."""
    k = key.lower()
    return any(k == e or k.endswith("_" + e) or k.endswith("-" + e) for e in SECRET_KEY_ENDINGS)


_URL_USER_INFO = re.compile(r"(?<=://)[^/?#@\s]+@")
URL_QUERY_VALUE = re.compile(r"(?<=[?&;])([^=&#\s/?;]+)=([^&#\s\"'<>),;]+)")
"""A URL's query parameter: its name and value (``?api_key=...``)."""


def redact_url(text: str) -> str:
    """``http://user:pass@host/x`` -> ``http://***@host/x``, and ``?api_key=...`` -> ``?api_key=***``:
    credentials inside a URL (its user-info, a query value under a secret's name), anywhere in a text."""
    text = _URL_USER_INFO.sub("***@", text)
    if "=" not in text:
        return text
    return URL_QUERY_VALUE.sub(lambda m: f"{m.group(1)}=***" if is_secret_key(unquote(m.group(1))) else m.group(0),
                               text)


# -- what a job holds ------------------------------------------------------------------------------

_USER_INFO = re.compile(r"://([^/?#@\s]+)@")


def url_secrets(text: str, where: str) -> list[Secret]:
    """The user-info of every URL in ``text``: its password, the whole ``user:password``, and that
    as a client sends it (``Authorization: Basic <base64>``), which a server may echo; and the
    value of every query parameter with a secret's name (``?api_key=...``)."""
    out = [Secret(unquote(m.group(2)), f"{where}'s {unquote(m.group(1))}") for m in URL_QUERY_VALUE.finditer(text)
           if "=" in text and is_secret_key(unquote(m.group(1)))]
    for info in _USER_INFO.findall(text):
        user, _, password = info.partition(":")
        if password:
            out.append(Secret(password, f"{where}'s password"))
            out.append(Secret(unquote(password), f"{where}'s password"))
        out.append(Secret(info, f"{where}'s user-info"))
        basic = f"{unquote(user)}:{unquote(password)}".encode()
        out.append(Secret(base64.b64encode(basic).decode(), f"{where}'s user-info"))
    return out


def data_secrets(data: Any, where: str = "") -> list[Secret]:
    """Values under secret-named keys (every string below them) and URL user-info, anywhere in ``data``."""
    out: list[Secret] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if is_secret_key(str(key)):
                out += [Secret(str(v), path) for v in _leaves(value) if v is not None and not isinstance(v, bool)]
            else:
                out += data_secrets(value, path)
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            out += data_secrets(value, f"{where}.{i}" if where else str(i))
    elif isinstance(data, str):
        out += url_secrets(data, where or "a URL")
    return out


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def env_secrets(names: Iterable[str], environ: Mapping[str, str] | None = None) -> list[Secret]:
    environ = os.environ if environ is None else environ
    return [Secret(environ[n], f"${n}") for n in names if environ.get(n, "").strip()]


STORAGE_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
"""What :mod:`genflow.data.storage` reads to reach a bucket."""


def plugin_secrets(factory: Any, params: Mapping[str, Any], where: str = "params",
                   environ: Mapping[str, str] | None = None) -> list[Secret]:
    """A plugin's secrets: its params' secret values and URL user-info, and the values of its ``secret_env``."""
    out = data_secrets(dict(params), where)
    try:
        names = factory.secret_env(factory.Params.model_validate(dict(params)))
    except Exception:  # params that do not validate were refused before; nothing more to learn here
        names = []
    return out + env_secrets(names, environ)


# -- the process's scrubber ------------------------------------------------------------------------

_installed = Scrubber()
_factory_installed = False


def install(scrubber: Scrubber) -> Scrubber:
    """Add ``scrubber``'s secrets to the process's (which only grows: a sweep's jobs add theirs), and
    scrub every log record made from now on. Returns the process's scrubber."""
    global _installed
    if scrubber:
        _installed = _installed.merged(scrubber)
    _install_record_factory()
    return _installed


def installed() -> Scrubber:
    """The secrets of every job this process has run: what its rows, logs and messages are scrubbed of."""
    return _installed


def scrub(text: str) -> str:
    """``text`` scrubbed of the process's secrets (the terminal's messages)."""
    return _installed.scrub(text)


def _install_record_factory() -> None:
    global _factory_installed
    if _factory_installed:
        return
    make = logging.getLogRecordFactory()

    def scrubbed_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if _installed:
            scrub_record(record, _installed)
        return record

    logging.setLogRecordFactory(scrubbed_record)
    _factory_installed = True


def scrub_record(record: logging.LogRecord, scrubber: Scrubber) -> None:
    """A log record's message, traceback and stack scrubbed before any handler formats it."""
    try:
        message = record.getMessage()
    except Exception:  # a record whose args do not fit its format: the handler reports that
        return
    clean = scrubber.scrub(message)
    if clean is not message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[0] is not None:
        out = io.StringIO()
        traceback.print_exception(*record.exc_info, file=out)
        text = out.getvalue().rstrip("\n")
        clean = scrubber.scrub(text)
        if clean is not text:
            record.exc_text = clean  # formatters use exc_text when it is set
    if record.stack_info:
        record.stack_info = scrubber.scrub(record.stack_info)
