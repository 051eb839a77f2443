"""Where candles come from: exchange clients the exchange actor runs on its worker threads."""
