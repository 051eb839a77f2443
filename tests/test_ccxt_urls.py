"""`api_base` replaces scheme and host of every REST URL of a ccxt client."""

from __future__ import annotations

import copy

import ccxt
import pytest

from candlekeeper.actors.sources.urls import rebase_urls


def test_every_url_of_a_real_client_is_rebased() -> None:
    ex = ccxt.binance()
    original = copy.deepcopy(ex.urls["api"])
    rebased = rebase_urls(ex.urls["api"], "http://127.0.0.1:8080")
    assert ex.urls["api"] == original  # not mutated
    assert rebased.keys() == original.keys()
    for key, url in original.items():
        assert rebased[key] == "http://127.0.0.1:8080" + url.split(".com", 1)[1]
    assert rebased["public"] == "http://127.0.0.1:8080/api/v3"
    assert rebased["fapiPublic"] == "http://127.0.0.1:8080/fapi/v1"


def test_nested_shapes_placeholders_and_non_urls() -> None:
    urls = {
        "rest": {"public": "https://api.{hostname}/v1?x=1", "list": ["https://a.example/p", 5]},
        "ws": "wss://stream.example/ws",
        "name": "not a url",
        "tuple": ("http://b.example:81/q",),
    }
    out = rebase_urls(urls, "https://127.0.0.1:9443/")
    assert out == {
        "rest": {"public": "https://127.0.0.1:9443/v1?x=1",
                 "list": ["https://127.0.0.1:9443/p", 5]},
        "ws": "wss://stream.example/ws",
        "name": "not a url",
        "tuple": ("https://127.0.0.1:9443/q",),
    }
    assert rebase_urls("https://api.example.com/v3", "http://h:1") == "http://h:1/v3"


def test_path_prefix_of_api_base_is_prepended() -> None:
    assert rebase_urls({"p": "https://x.com/api/v3"}, "http://proxy:8/binance/") == {
        "p": "http://proxy:8/binance/api/v3"}


@pytest.mark.parametrize("bad", ["127.0.0.1:8080", "ftp://h", "http://", ""])
def test_bad_api_base_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        rebase_urls({"p": "https://x.com/a"}, bad)
