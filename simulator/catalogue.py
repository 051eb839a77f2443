"""Realistic price levels and each exchange's default spot market list.

Prices are USD levels of late 2025 (forex and metals: those of the OANDA story), only meant
to make numbers look like the real thing (BTC near 90,000 USDT, DOGE near 0.15, EUR/USD near
1.08): the history module scales its deterministic path around them. A pair's level is
``usd(base) / usd(quote)``; unknown assets fall back to a hashed level.
"""

from __future__ import annotations

#: Approximate USD value of one unit of each asset.
USD_PRICE: dict[str, float] = {
    "BTC": 90_000.0, "ETH": 3_000.0, "SOL": 150.0, "XRP": 2.0, "DOGE": 0.15, "ADA": 0.6,
    "TRX": 0.25, "AVAX": 25.0, "LINK": 15.0, "DOT": 5.0, "LTC": 90.0, "BCH": 450.0,
    "XLM": 0.3, "ATOM": 6.0, "UNI": 8.0, "NEAR": 3.0, "APT": 6.0, "ARB": 0.5, "OP": 1.2,
    "FIL": 3.0, "ETC": 20.0, "SUI": 3.0, "SHIB": 0.000013, "PEPE": 0.00001, "TON": 3.0,
    "ICP": 6.0, "AAVE": 250.0, "INJ": 15.0, "HBAR": 0.2, "SEI": 0.3, "BNB": 650.0,
    "XMR": 250.0, "ALGO": 0.2, "MKR": 1_500.0, "GRT": 0.15,
    # quote assets
    "USDT": 1.0, "USDC": 1.0, "USD": 1.0, "DAI": 1.0, "EUR": 1.08, "GBP": 1.27,
    # forex and metals (OANDA): USD/JPY ~150, AUD/USD ~0.66, USD/CHF ~0.88, USD/CAD ~1.37
    "JPY": 1 / 150.0, "AUD": 0.66, "NZD": 0.60, "CHF": 1.13, "CAD": 0.73, "SGD": 0.75,
    "XAU": 2_400.0, "XAG": 30.0, "SPX500": 5_900.0,
}

#: Thirty liquid bases every default list quotes against its main stable/fiat.
MAJOR_BASES: tuple[str, ...] = (
    "BTC", "ETH", "SOL", "XRP", "DOGE", "ADA", "TRX", "AVAX", "LINK", "DOT", "LTC", "BCH",
    "XLM", "ATOM", "UNI", "NEAR", "APT", "ARB", "OP", "FIL", "ETC", "SUI", "SHIB", "PEPE",
    "TON", "ICP", "AAVE", "INJ", "HBAR", "SEI",
)

_USDT_VENUE_EXTRA = ("ETH/BTC", "SOL/BTC", "XRP/BTC", "LTC/BTC", "BTC/USDC", "ETH/USDC",
                     "SOL/USDC")
_USD_VENUE_EXTRA = ("ETH/BTC", "SOL/BTC", "BTC/EUR", "ETH/EUR", "SOL/EUR", "BTC/USDT",
                    "ETH/USDT", "USDT/USD", "BTC/USDC")

#: dialect -> its default listed spot markets (~40), in listing order.
DEFAULT_MARKETS: dict[str, tuple[str, ...]] = {
    "binance": tuple(f"{b}/USDT" for b in MAJOR_BASES) + _USDT_VENUE_EXTRA
    + ("BTC/EUR", "ETH/EUR", "BNB/USDT"),
    "okx": tuple(f"{b}/USDT" for b in MAJOR_BASES) + _USDT_VENUE_EXTRA + ("BTC/EUR", "ETH/EUR"),
    "bybit": tuple(f"{b}/USDT" for b in MAJOR_BASES) + _USDT_VENUE_EXTRA + ("BTC/EUR",
                                                                            "ETH/EUR"),
    "kucoin": tuple(f"{b}/USDT" for b in MAJOR_BASES) + _USDT_VENUE_EXTRA + ("DOGE/BTC",
                                                                             "ADA/BTC"),
    "coinbase": tuple(f"{b}/USD" for b in MAJOR_BASES) + _USD_VENUE_EXTRA,
    "kraken": tuple(f"{b}/USD" for b in MAJOR_BASES) + _USD_VENUE_EXTRA + ("XMR/USD",),
    # OANDA names them EUR_USD...: majors, crosses, two metals and one index CFD
    "oanda": ("EUR/USD", "USD/JPY", "GBP/USD", "AUD/USD", "USD/CHF", "USD/CAD", "NZD/USD",
              "EUR/GBP", "EUR/JPY", "GBP/JPY", "EUR/CHF", "AUD/JPY", "EUR/AUD", "GBP/CHF",
              "CAD/JPY", "USD/SGD", "XAU/USD", "XAG/USD", "XAU/EUR", "SPX500/USD"),
}


def usd_level(asset: str) -> float | None:
    """USD value of one unit of `asset`, or None if unknown."""
    return USD_PRICE.get(asset.upper())


def pair_level(base: str, quote: str) -> float | None:
    """Price of BASE in QUOTE from the table, or None if either asset is unknown."""
    b, q = usd_level(base), usd_level(quote)
    if b is None or q is None:
        return None
    return b / q


def default_markets(dialect: str, also: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The dialect's default market list followed by any extra `also` symbols not in it."""
    out = list(DEFAULT_MARKETS[dialect])
    seen = {s.upper() for s in out}
    for s in also:
        if s.upper() not in seen:
            out.append(s)
            seen.add(s.upper())
    return out


#: Currencies (ISO codes) and metals: pairs of these move far less than crypto pairs.
FIAT: frozenset[str] = frozenset({"USD", "EUR", "GBP", "JPY", "AUD", "NZD", "CHF", "CAD", "SGD"})
METALS: frozenset[str] = frozenset({"XAU", "XAG", "XPT", "XPD"})


def volatility(base: str, quote: str) -> float:
    """Volatility of BASE/QUOTE relative to a crypto pair: a currency pair ~0.1 (EUR/USD moves
    a pip or two a minute), a metal ~0.3, anything else 1."""
    b, q = base.upper(), quote.upper()
    if b in FIAT and q in FIAT:
        return 0.1
    if b in METALS and q in FIAT:
        return 0.3
    return 1.0
