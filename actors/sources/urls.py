"""Point a ccxt client at another host: the daemon's `api_base` option."""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

U = TypeVar("U")


def rebase_urls(urls: U, api_base: str) -> U:
    """Return a copy of `urls` with the scheme and host of every http(s) URL string replaced
    by those of `api_base` (e.g. "http://127.0.0.1:8080").

    Use on a ccxt client's REST URL table: `ex.urls["api"] = rebase_urls(ex.urls["api"], base)`.
    ccxt keeps it as nested dicts/lists of strings (binance: public, private, sapi, fapi...),
    and some exchanges use a plain string; every shape is walked and nothing is mutated.
    Paths, queries and `{hostname}`-style placeholders in paths are kept; a path in `api_base`
    (a reverse-proxy prefix) is prepended to each URL's path. Strings that are not http(s)
    URLs (ws/wss endpoints, plain values) are returned unchanged: this is for REST only.
    """
    base = urlsplit(api_base)
    if base.scheme not in ("http", "https") or not base.netloc:
        raise ValueError(f"api_base must look like http(s)://host[:port], got {api_base!r}")
    prefix = base.path.rstrip("/")

    def walk(value: object) -> object:
        if isinstance(value, str):
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                return value
            return urlunsplit((base.scheme, base.netloc, prefix + parts.path, parts.query,
                               parts.fragment))
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple):
            return tuple(walk(v) for v in value)
        return value

    return walk(urls)  # type: ignore[return-value]
