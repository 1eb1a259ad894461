"""Fault plans: data in, the same data out, from JSON and YAML; seeds replay."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mock_server.chaos import (
    AfterBytes,
    AfterEvent,
    Down,
    Drop,
    FaultPlan,
    HttpError,
    Latency,
    LostAck,
    Match,
    OnConnection,
    OnRequest,
    Reset,
    Rule,
    derive_seed,
    rng_for,
)

JSON_PLAN = """
{
  "seed": 42,
  "name": "reconnects",
  "rules": [
    {"trigger": {"kind": "after_event", "n": 37}, "fault": {"kind": "drop", "how": "reset"},
     "match": {"method": "GET", "live": "sse"}},
    {"trigger": {"kind": "after_bytes", "bytes": 1500}, "fault": {"kind": "fin"}, "count": 2},
    {"trigger": {"kind": "connection", "k": 3}, "fault": {"kind": "latency", "ms": 50,
     "jitter_ms": 20}, "count": null},
    {"trigger": {"kind": "request", "k": 2}, "fault": {"kind": "http_error", "status": 503,
     "retry_after": 1}, "match": {"method": "POST"}},
    {"trigger": {"kind": "probability", "p": 0.1}, "fault": {"kind": "lost_ack"}}
  ]
}
"""

YAML_PLAN = """
seed: 42
name: reconnects
rules:
  - trigger: {kind: after_event, n: 37}
    fault: {kind: drop, how: reset}
    match: {method: GET, live: sse}
  - trigger: {kind: after_bytes, bytes: 1500}
    fault: {kind: fin}
    count: 2
  - trigger: {kind: connection, k: 3}
    fault: {kind: latency, ms: 50, jitter_ms: 20}
    count: null
  - trigger: {kind: request, k: 2}
    fault: {kind: http_error, status: 503, retry_after: 1}
    match: {method: POST}
  - trigger: {kind: probability, p: 0.1}
    fault: {kind: lost_ack}
"""


def test_json_and_yaml_give_the_same_plan(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text(JSON_PLAN)
    (tmp_path / "plan.yaml").write_text(YAML_PLAN)
    (tmp_path / "plan.yml").write_text(YAML_PLAN)
    from_json = FaultPlan.from_file(tmp_path / "plan.json")
    assert FaultPlan.from_file(tmp_path / "plan.yaml") == from_json
    assert FaultPlan.from_file(tmp_path / "plan.yml") == from_json
    assert from_json.rules[0].trigger == AfterEvent(n=37)
    assert from_json.rules[0].fault == Drop(how="reset")
    assert from_json.rules[2].count is None
    assert [r.layer for r in from_json.rules] == ["server", "proxy", "proxy", "server", "server"]


def test_round_trips_through_json_and_yaml() -> None:
    plan = FaultPlan.from_json(JSON_PLAN)
    assert FaultPlan.from_json(plan.to_json()) == plan
    assert FaultPlan.from_yaml(plan.to_yaml()) == plan


def test_built_in_python_equals_loaded() -> None:
    plan = FaultPlan(
        seed=42,
        name="reconnects",
        rules=[
            Rule(
                trigger=AfterEvent(n=37),
                fault=Drop(how="reset"),
                match=Match(method="GET", live="sse"),
            ),
            Rule(trigger=AfterBytes(bytes=1500), fault=Reset(), count=2),
        ],
    )
    assert FaultPlan.from_json(plan.to_json()) == plan
    assert "after_event(n=37, control=True) -> drop(how=reset) x1" in plan.describe()


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"trigger": {"kind": "after_event", "n": 1}, "fault": {"kind": "reset"}}, "proxy trigger"),
        (
            {"trigger": {"kind": "after_bytes", "bytes": 1}, "fault": {"kind": "drop"}},
            "server trigger",
        ),
        (
            {"trigger": {"kind": "after_event", "n": 1}, "fault": {"kind": "delay", "ms": 1}},
            "works with",
        ),
        ({"trigger": {"kind": "always"}, "fault": {"kind": "fin"}, "match": {}}, "only bytes"),
        ({"trigger": {"kind": "always"}, "fault": {"kind": "nope"}}, "does not match any"),
        ({"trigger": {"kind": "always"}, "fault": {"kind": "fin"}, "typo": 1}, "Extra inputs"),
        ({"trigger": {"kind": "connection", "k": 0}, "fault": {"kind": "fin"}}, "greater than"),
        (
            {"trigger": {"kind": "at_offset", "offset": "7"}, "fault": {"kind": "drop"}},
            "invalid offset",
        ),
    ],
)
def test_invalid_rules_say_why(rule: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FaultPlan.model_validate({"rules": [rule]})


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text("")
    with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
        FaultPlan.from_file(path)


def test_empty_yaml_is_an_empty_plan() -> None:
    assert FaultPlan.from_yaml("") == FaultPlan()


def test_layers_keep_their_rule_indexes() -> None:
    plan = FaultPlan(
        rules=[
            Rule(trigger=OnConnection(k=1), fault=Down(duration_ms=10)),
            Rule(trigger=OnRequest(k=1), fault=HttpError()),
            Rule(trigger=OnConnection(k=2), fault=Latency(ms=1)),
            Rule(trigger=OnRequest(k=2), fault=LostAck()),
        ]
    )
    assert [i for i, _ in plan.for_layer("proxy")] == [0, 2]
    assert [i for i, _ in plan.for_layer("server")] == [1, 3]


def test_seeds_derive_by_hashing_not_from_the_global_generator() -> None:
    import random

    random.seed(1)
    first = [rng_for(7, "proxy", n).random() for n in range(5)]
    random.seed(2)
    assert [rng_for(7, "proxy", n).random() for n in range(5)] == first
    assert len(set(first)) == 5  # connections get unrelated streams
    assert derive_seed(7, "proxy", 1) != derive_seed(8, "proxy", 1)
    assert derive_seed(7, "a", 1) == derive_seed(7, "a", 1)


def test_random_plans_replay_from_their_seed() -> None:
    plans = [FaultPlan.random(seed) for seed in range(300)]
    assert [FaultPlan.random(seed) for seed in range(300)] == plans
    assert len({p.to_json() for p in plans}) == 300
    kinds = {rule.fault.kind for plan in plans for rule in plan.rules}
    assert kinds == {
        "reset", "fin", "latency", "bandwidth", "slicer", "down",
        "drop", "http_error", "lost_ack", "duplicate", "delay", "ws_close",
    }  # fmt: skip
    assert all(1 <= len(p.rules) <= 3 for p in plans)


def test_random_plans_can_be_limited_to_a_layer_and_kinds() -> None:
    proxy_only = FaultPlan.random(5, layers=["proxy"])
    assert all(rule.layer == "proxy" for rule in proxy_only.rules)
    halfopen = FaultPlan.random(5, kinds=["half_open"], max_rules=1)
    assert [r.fault.kind for r in halfopen.rules] == ["half_open"]
    with pytest.raises(ValueError, match="no fault kinds"):
        FaultPlan.random(5, layers=["proxy"], kinds=["lost_ack"])
