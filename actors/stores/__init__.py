"""Where candles go: the store classes the storage actor owns (plain classes, no threads)."""
