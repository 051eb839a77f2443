"""An HTTP response before it is written, and the body styles every dialect shares."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

JSON_TYPE = "application/json;charset=UTF-8"
HTML_TYPE = "text/html"

_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Time-out"}


@dataclass
class Reply:
    """An HTTP response before it is written (headers beyond Content-* only).

    `poisoned` marks a deliberately broken candle page, so the server can count it."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    poisoned: bool = False


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_reply(status: int, obj: object, **headers: str) -> Reply:
    return Reply(status, dumps(obj), headers=dict(headers))


def reason(status: int) -> str:
    return _REASONS.get(status, "Error")


def gateway_page(status: int) -> Reply:
    """The HTML page an edge proxy (nginx, CloudFront, Cloudflare) sends for 5xx/429: no JSON,
    so ccxt falls back to its HTTP-status table."""
    r = reason(status)
    html = f"<html>\r\n<head><title>{status} {r}</title></head>\r\n<body>\r\n" \
           f"<center><h1>{status} {r}</h1></center>\r\n</body>\r\n</html>\r\n"
    return Reply(status, html.encode(), content_type=HTML_TYPE)
