"""What an alert looks like on the wire: a Slack incoming-webhook message, a PagerDuty Events API v2
event; and the redaction that keeps webhook URLs and routing keys out of every text."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .rules import MAX_SUMMARY, SOURCE, Alert, jsonable

SLACK_ICONS = {
    "critical": ":rotating_light:", "error": ":red_circle:", "warning": ":warning:", "info": ":information_source:"
}
RESOLVED_ICON = ":large_green_circle:"


def slack_payload(alert: Alert) -> dict[str, Any]:
    """A Slack incoming-webhook message: a readable `text` line (what notifications show) and
    the same in blocks with a context line."""
    if alert.action == "resolve":
        text = f"{RESOLVED_ICON} resolved: {alert.summary}"
    else:
        text = f"{SLACK_ICONS.get(alert.severity, ':red_circle:')} {alert.severity.upper()}: {alert.summary}"
    context = f"{SOURCE} · {alert.group} `{alert.component}` · dedup_key `{alert.dedup_key}`"
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        ],
    }


def pagerduty_payload(alert: Alert, routing_key: str) -> dict[str, Any]:
    """A PagerDuty Events API v2 event: `trigger` with its payload, or `resolve` (key only)."""
    body: dict[str, Any] = {"routing_key": routing_key, "event_action": alert.action, "dedup_key": alert.dedup_key}
    if alert.action == "trigger":
        body["payload"] = {
            "summary": alert.summary[:MAX_SUMMARY],
            "source": SOURCE,
            "severity": alert.severity,
            "component": alert.component,
            "group": alert.group,
            "custom_details": jsonable(dict(alert.details)),
        }
    return body


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret (and a URL secret's path) replaced by `***`."""
    for secret in secrets:
        if not secret:
            continue
        text = text.replace(secret, "***")
        _, sep, rest = secret.partition("://")
        if sep and "/" in rest:
            path = rest[rest.index("/"):]
            if len(path) > 1:
                text = text.replace(path, "/***")
    return text
