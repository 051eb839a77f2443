"""The ingestion actors (exchange, series, storage, health, notifier, metrics) and their messages.

Subpackages hold what the actors wrap: `market` (candles, symbols, error classes), `sources`
(exchange clients), `stores` (databases), `alerting` (alert rules and delivery).
"""
