"""Properties over real HTTP: options round-trip, forbidden keys anywhere, the daisy-chain target rule.

Each example registers its own users, so examples never see one another's data even though they
share one service and database. FLTRAINING_PROPERTY_EXAMPLES raises the number of examples.
"""

import os
from typing import Any

from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fltraining.options import INT64_MAX, INT64_MIN, TrainingOptions, is_forbidden_key
from tests.helpers import (
    create_training,
    get_training,
    register,
    stored_training,
    training_total,
    upload_model,
)

MAX_DEPTH = 8  # FLTRAINING_MAX_OPTIONS_DEPTH's default: `options` itself is level 1
# Every key the service validates: a free key must be none of them (Hypothesis draws strings from the code too).
KNOWN_KEYS = frozenset(TrainingOptions.model_fields)

PROPERTY = settings(
    max_examples=int(os.environ.get("FLTRAINING_PROPERTY_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text as JSON carries it: any Unicode scalar value (lone surrogates are not encodable in UTF-8).
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
allowed_keys = text.filter(lambda key: not is_forbidden_key(key))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)


def json_values(levels: int) -> st.SearchStrategy[Any]:
    """JSON values holding at most `levels` levels of arrays/objects (0: scalars only)."""
    if levels == 0:
        return scalars
    inner = json_values(levels - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=4),
        st.dictionaries(allowed_keys, inner, max_size=4),
    )


uncertainty_objects = st.fixed_dictionaries(
    {},
    optional={
        "N": st.integers(min_value=1, max_value=1000),
        "seed": st.none() | st.integers(min_value=0, max_value=2**31 - 1),
        "softmax": st.booleans(),
        "extra": json_values(MAX_DEPTH - 2),
    },
)
known_options = st.fixed_dictionaries(
    {},
    optional={
        "daisy_chain_period": st.none() | st.integers(min_value=0, max_value=1_000_000),
        "uncertainty": st.none() | uncertainty_objects,
        "skip_model_tests": st.none() | st.booleans(),
    },
)


@st.composite
def valid_options(draw: st.DrawFn) -> dict[str, Any]:
    """Any option object within the nesting limit, known keys absent or valid."""
    free = draw(
        st.dictionaries(
            allowed_keys.filter(lambda key: key not in KNOWN_KEYS), json_values(MAX_DEPTH - 1), max_size=6
        )
    )
    return {**free, **draw(known_options)}


forbidden_keys = st.one_of(
    st.builds(lambda rest: "$" + rest, text),
    st.builds(lambda head, tail: head + "." + tail, text, text),
    st.builds(lambda head, tail: head + "\x00" + tail, text, text),
)


def add_entry(draw: st.DrawFn, options: dict[str, Any], key: str, value: Any) -> list[str | int]:
    """Put `key: value` into an object at a random place within the nesting limit; return its path."""
    node: Any = options
    path: list[str | int] = []
    while True:
        depth = len(path) + 1  # the nesting level of `node`
        moves: list[tuple[str, Any]] = [("here", None)] if isinstance(node, dict) else []
        if isinstance(node, list) and depth < MAX_DEPTH:
            moves.append(("append", None))
        children = node.items() if isinstance(node, dict) else enumerate(node)
        # Lists one level above the limit hold only scalars, so there is nowhere to go inside them.
        moves += [
            ("into", step)
            for step, child in children
            if isinstance(child, dict) or (isinstance(child, list) and depth + 1 < MAX_DEPTH)
        ]
        move, step = draw(st.sampled_from(moves))
        if move == "here":
            node[key] = value
            return [*path, key]
        if move == "append":
            node.append({key: value})
            return [*path, len(node) - 1, key]
        path.append(step)
        node = node[step]


@st.composite
def options_with_forbidden_key(draw: st.DrawFn) -> tuple[dict[str, Any], list[str | int]]:
    """A valid option object with one forbidden key added at a random place, and that key's path."""
    options = draw(valid_options())
    return options, add_entry(draw, options, draw(forbidden_keys), draw(json_values(2)))


lone_surrogates = st.characters(categories=["Cs"])
non_text = st.builds(lambda head, surrogate, tail: head + surrogate + tail, text, lone_surrogates, text)


@st.composite
def options_with_non_text(draw: st.DrawFn) -> tuple[dict[str, Any], list[str | int]]:
    """A valid option object with a lone surrogate in one key or string value, and that entry's path."""
    options = draw(valid_options())
    if draw(st.booleans()):
        return options, add_entry(draw, options, draw(non_text), draw(json_values(2)))
    return options, add_entry(draw, options, draw(allowed_keys), draw(non_text))


async def assert_options_refused(
    client: TestClient, options: dict[str, Any], error_path: list[str | int], error_type: str
) -> None:
    """POST and PATCH with these options are 400 naming the entry, and change nothing."""
    actor = await register(client)
    model_id = await upload_model(client, actor)
    response = await client.post(
        "/api/trainings/",
        json={"model_id": model_id, "target_num_updates": 3, "options": options},
        headers=actor.headers,
    )
    assert response.status == 400, await response.text()
    error = await response.json()
    assert {"loc": ["options", *error_path], "type": error_type} in [
        {"loc": item["loc"], "type": item["type"]} for item in error["errors"]
    ], error
    assert await training_total(client, actor) == 0

    # Replacing the options of an existing training with the same object is refused too.
    training_id = await create_training(client, actor, model_id, options={"kept": 1})
    before = await get_training(client, actor, training_id)
    response = await client.patch(
        f"/api/trainings/{training_id}/", json={"options": options}, headers=actor.headers
    )
    assert response.status == 400, await response.text()
    assert await get_training(client, actor, training_id) == before


def json_kind(value: Any) -> type:
    """The JSON type of a value (PyMongo's Int64 is an int)."""
    return next(kind for kind in (bool, int, float, str, dict, list, type(None)) if isinstance(value, kind))


def same_json(left: Any, right: Any) -> bool:
    """Equality that also tells 1 from 1.0 and True, and keeps object key order."""
    if json_kind(left) is not json_kind(right):
        return False
    if isinstance(left, dict):
        return list(left) == list(right) and all(same_json(left[key], right[key]) for key in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same_json, left, right))
    return bool(left == right)


@PROPERTY
@given(options=valid_options())
async def test_any_valid_options_round_trip_unchanged(
    client: TestClient, database_url: str, options: dict[str, Any]
) -> None:
    actor = await register(client)
    training_id = await create_training(client, actor, options=options)
    served = (await get_training(client, actor, training_id))["options"]
    assert same_json(served, options), (served, options)
    stored = await stored_training(database_url, training_id)
    assert stored is not None
    assert same_json(stored["options"], options), (stored["options"], options)


@PROPERTY
@given(case=options_with_forbidden_key())
async def test_a_forbidden_key_anywhere_is_400_and_writes_nothing(
    client: TestClient, case: tuple[dict[str, Any], list[str | int]]
) -> None:
    options, error_path = case
    await assert_options_refused(client, options, error_path, "forbidden_key")


@PROPERTY
@given(case=options_with_non_text())
async def test_a_lone_surrogate_anywhere_is_400_and_writes_nothing(
    client: TestClient, case: tuple[dict[str, Any], list[str | int]]
) -> None:
    # JSON's \ud800 escape decodes to a string that is not Unicode text; BSON cannot hold it.
    options, error_path = case
    await assert_options_refused(client, options, error_path, "string_unicode")


periods = st.one_of(st.just("absent"), st.none(), st.integers(min_value=0, max_value=1000))
requested_targets = st.integers(min_value=1, max_value=1_000_000)


def expected_target(requested: int, period: int | str | None) -> int:
    """The seed's rule, stated independently of the service's code."""
    return requested * period if isinstance(period, int) and period > 0 else requested


@PROPERTY
@given(period=periods, requested=requested_targets, patched=requested_targets)
async def test_stored_target_is_requested_times_a_positive_period(
    client: TestClient, database_url: str, period: int | str | None, requested: int, patched: int
) -> None:
    actor = await register(client)
    options = {} if period == "absent" else {"daisy_chain_period": period}
    training_id = await create_training(client, actor, target_num_updates=requested, options=options)
    assert (await get_training(client, actor, training_id))["target_num_updates"] == expected_target(
        requested, period
    )
    stored = await stored_training(database_url, training_id)
    assert stored is not None
    assert stored["target_num_updates"] == expected_target(requested, period)
    assert stored["options"] == options

    # A PATCH of the target applies the same rule with the training's period.
    response = await client.patch(
        f"/api/trainings/{training_id}/", json={"target_num_updates": patched}, headers=actor.headers
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["target_num_updates"] == expected_target(patched, period)
    stored = await stored_training(database_url, training_id)
    assert stored is not None
    assert stored["target_num_updates"] == expected_target(patched, period)
