"""One TLS context for every ccxt client of the process (actors/sources/tls.py)."""

from __future__ import annotations

import ssl
import time

import ccxt.async_support as ccxt_async

from candlekeeper.actors.sources.ccxt_source import CcxtSource
from candlekeeper.actors.sources.ccxt_stream import pro_client
from candlekeeper.actors.sources.tls import share_tls_context


def test_every_ccxt_client_shares_one_tls_context() -> None:
    """ccxt would load its CA bundle into a new context for each client it opens; the REST and
    stream clients of every exchange share one, unless a client verifies nothing or wants the
    OS's CAs too (then ccxt makes its own, as it would)."""
    rest = CcxtSource("binance", symbols=["BTC/USDT"], timeout=5, wall=time.time).client
    stream = pro_client("okx", symbols=["BTC/USDT"], timeout=5)
    assert rest.ssl_context is not None and rest.ssl_context is stream.ssl_context
    assert rest.ssl_context.verify_mode == ssl.CERT_REQUIRED and rest.ssl_context.check_hostname
    for config in ({"verify": False}, {"options": {"include_OS_certificates": True}}):
        own = ccxt_async.kraken(config)
        share_tls_context(own)
        assert own.ssl_context is None  # ccxt's open() makes it
