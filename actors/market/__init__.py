"""Candles, symbols and the one classifier of exchange errors: the vocabulary every actor shares."""
