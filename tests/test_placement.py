"""Weighted rendezvous placement: stable, order-free, proportional, and minimal movement."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from candlekeeper.actors.messages import SeriesKey
from candlekeeper.actors.placement import rendezvous_owner, series_id

node_names = st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=8)
weights = st.floats(min_value=0.01, max_value=1000, allow_nan=False)
clusters = st.dictionaries(node_names, weights, min_size=1, max_size=8)
series = st.lists(
    st.tuples(st.sampled_from(["binance", "okx", "kraken"]), st.text(min_size=1, max_size=10), st.sampled_from(["1m", "1h"])),
    min_size=1, max_size=40, unique=True,
)


def placement(keys, nodes):
    return {k: rendezvous_owner(k, nodes) for k in keys}


@given(clusters, series)
def test_owner_is_a_node_and_order_does_not_matter(nodes, keys):
    forward = placement(keys, nodes)
    backward = placement(keys, dict(reversed(list(nodes.items()))))
    assert forward == backward
    assert set(forward.values()) <= set(nodes)


@given(clusters, series, node_names, weights)
def test_a_joining_node_only_takes_series(nodes, keys, new, weight):
    if new in nodes:
        return
    before = placement(keys, nodes)
    after = placement(keys, {**nodes, new: weight})
    for k in keys:
        assert after[k] in (before[k], new)


@given(clusters, series)
def test_a_leaving_node_only_gives_up_its_own_series(nodes, keys):
    gone = min(nodes)
    before = placement(keys, nodes)
    rest = {n: w for n, w in nodes.items() if n != gone}
    after = placement(keys, rest)
    for k in keys:
        if before[k] != gone:
            assert after[k] == before[k]
        else:
            assert after[k] != gone and (after[k] is None) == (not rest)


@given(clusters, series, st.floats(min_value=1.01, max_value=100))
def test_raising_a_weight_only_pulls_series_to_that_node(nodes, keys, factor):
    node = max(nodes)
    before = placement(keys, nodes)
    after = placement(keys, {**nodes, node: nodes[node] * factor})
    for k in keys:
        assert after[k] in (before[k], node)
        assert before[k] != node or after[k] == node


@given(series)
def test_no_positive_weight_no_owner(keys):
    for k in keys:
        assert rendezvous_owner(k, {}) is None
        assert rendezvous_owner(k, {"a": 0.0, "b": -1.0, "c": float("nan")}) is None
        assert rendezvous_owner(k, {"a": 0.0, "b": 2.0}) == "b"


@settings(max_examples=20)
@given(series)
def test_key_forms_agree(keys):
    nodes = {"n1": 1.0, "n2": 2.0, "n3": 3.0}
    for e, s, t in keys:
        owner = rendezvous_owner((e, s, t), nodes)
        assert owner == rendezvous_owner(SeriesKey(e, s, t), nodes) == rendezvous_owner(f"{e}:{s}@{t}", nodes)
    assert series_id(SeriesKey("binance", "BTC/USDT", "1m")) == "binance:BTC/USDT@1m"


def test_shares_follow_weights():
    nodes = {"small": 1.0, "medium": 2.0, "large": 5.0}
    keys = [("binance", f"S{i}/USDT", "1m") for i in range(16_000)]
    shares = Counter(rendezvous_owner(k, nodes) for k in keys)
    for node, weight in nodes.items():
        expected = len(keys) * weight / sum(nodes.values())
        assert abs(shares[node] - expected) < 0.05 * expected, (node, shares[node], expected)


def test_placement_is_stable_across_processes():
    """blake2b, not hash(): every daemon computes the same owner (pinned values)."""
    nodes = {"alpha": 1.0, "beta": 1.0, "gamma": 1.0}
    got = [rendezvous_owner(("binance", f"S{i}/USDT", "1m"), nodes) for i in range(6)]
    assert got == PINNED


PINNED = ["gamma", "beta", "alpha", "alpha", "gamma", "alpha"]
