"""Alerts: which status changes are alerts, with dedup (`rules`), what they look like on the wire
(`payloads`), and how each destination is paced and retried (`delivery`). Pure: the notifier actor
feeds them messages, outcomes and time, and does what they answer."""

from .delivery import COUNTERS, Decision, Delivery, DeliveryFailed, Outbox, Outcome, Sent, decide, delivery_policy
from .payloads import pagerduty_payload, redact, slack_payload
from .rules import (
    DEFAULT_PAGERDUTY_URL,
    Alert,
    AlertState,
    AlertTracker,
    AlertTuning,
    breaker_key,
    gave_up_key,
    quarantine_key,
    storage_key,
)

__all__ = [
    "COUNTERS", "DEFAULT_PAGERDUTY_URL", "Alert", "AlertState", "AlertTracker", "AlertTuning", "Decision", "Delivery",
    "DeliveryFailed", "Outbox", "Outcome", "Sent", "breaker_key", "decide", "delivery_policy", "gave_up_key",
    "pagerduty_payload", "quarantine_key", "redact", "slack_payload", "storage_key",
]
