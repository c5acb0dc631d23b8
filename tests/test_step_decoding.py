"""The step envelope is decoded by a compiled decoder (msgspec); its inputs must come out exactly
as ``json.loads`` reads the message, as they did before. Checked on what PostgreSQL really
sends: a jsonb message's text, for edge numbers and for generated documents."""

from __future__ import annotations

import json
import math
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasker_worker.domain.steps import StepMessage
from tasker_worker.errors import StepValidationError

EDGE_NUMBERS = [
    "1e400",  # jsonb keeps it as a numeric and prints 401 digits: json.loads gives an int
    "-1e400",
    "1e-400",
    "123456789012345678901234567890",
    "-9223372036854775809",
    "18446744073709551616",
    "9007199254740993",
    "1.7976931348623157e308",
    "5e-324",
    "3.141592653589793238462643383279",
    "1.50",
    "-0",
    "0.0",
    "1E2",
]


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (1 and 1.0 differ, as do -0.0 and 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return (a == b and math.copysign(1, a) == math.copysign(1, b)) or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def _through_jsonb(conn: psycopg.Connection[Any], inputs_json: str) -> str:
    """A step message with these inputs, as PostgreSQL prints it from a jsonb column."""
    envelope = json.dumps(StepMessage.build("dec", "noop"))
    row = conn.execute("SELECT jsonb_set(%s::jsonb, '{inputs}', %s::jsonb)::text", (envelope, inputs_json)).fetchone()
    assert row is not None
    return str(row[0])


def test_edge_numbers_decode_as_json_loads(conn: psycopg.Connection[Any]) -> None:
    for number in EDGE_NUMBERS:
        text = _through_jsonb(conn, f'{{"n": {number}, "list": [{number}], "deep": {{"x": [[{number}]]}}}}')
        decoded = StepMessage.decode(text)
        assert _same(decoded.inputs, json.loads(text)["inputs"]), number
    # Not through jsonb (a message decoded from elsewhere): the literal 1e400 is json.loads' inf.
    body = StepMessage.build("dec", "noop")
    literal = json.dumps(body)[:-1] + ', "inputs": {"x": 1e400, "y": [1e-400]}}'
    assert _same(StepMessage.decode(literal).inputs, {"x": math.inf, "y": [0.0]})


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=st.dictionaries(st.text(max_size=8), _json, max_size=6))
def test_generated_inputs_decode_as_json_loads(conn: psycopg.Connection[Any], inputs: dict[str, Any]) -> None:
    # jsonb refuses the NUL character; producers cannot send it either.
    source = json.dumps(inputs)
    if "\\u0000" in source:
        return
    text = _through_jsonb(conn, source)
    assert _same(StepMessage.decode(text).inputs, json.loads(text)["inputs"])


def test_uuid_spellings_the_contract_accepted_still_decode() -> None:
    body = StepMessage.build("dec", "noop", {"a": 1})
    canonical = body["step_uuid"]
    for spelling in ("{" + canonical + "}", "urn:uuid:" + canonical, canonical.upper(), canonical.replace("-", "")):
        step = StepMessage.decode(json.dumps({**body, "step_uuid": spelling}))
        assert str(step.step_uuid) == canonical


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("[1, 2]", "must be a JSON object"),
        ('{"handler": "x"}', "missing required field"),
        ("not json", "not valid JSON"),
        ('{"step_uuid": "zz"}', "step_uuid"),
    ],
)
def test_invalid_messages_are_one_readable_line(body: str, reason: str) -> None:
    with pytest.raises(StepValidationError) as info:
        StepMessage.decode(body)
    assert reason in str(info.value) and "\n" not in str(info.value)
    assert info.value.reason == "malformed_message"


def test_field_rules_hold() -> None:
    body = StepMessage.build("dec", "noop")
    for bad in ({"attempt_limit": 0}, {"attempt_limit": 101}, {"timeout": 0}, {"handler": "a b"}, {"inputs": [1]}):
        with pytest.raises(StepValidationError):
            StepMessage.decode(json.dumps({**body, **bad}))
    lenient = StepMessage.decode(json.dumps({**body, "attempt_limit": "3", "timeout": 2, "extra": True}))
    assert lenient.attempt_limit == 3 and lenient.timeout == 2.0
