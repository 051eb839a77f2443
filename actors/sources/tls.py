"""One TLS context for every ccxt client of the process.

ccxt builds a fresh `ssl.SSLContext` for each client it opens (loading certifi's CA bundle:
some 20 ms of CPU, and its memory): every exchange actor and stream, again at each restart. A
context is safe to share between threads and event loops, and these clients all verify against
the same bundle, so they share the first one made.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any


@functools.cache
def _context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def share_tls_context(client: Any) -> None:
    """Give a ccxt async or pro `client`, not yet opened, the process's context for its CA file
    (a client that verifies nothing, or also wants the OS's CAs, keeps ccxt's own way)."""
    if client.ssl_context is None and client.verify and not client.safe_bool(
            client.options, "include_OS_certificates", False):
        client.ssl_context = _context(client.cafile)
