"""Alerts: which status changes are alerts (with dedup) and how each destination is paced and retried."""
