"""Schemathesis over the served OpenAPI document: no 5xx, every answer as documented, the store still valid.

`FLTRAINING_FUZZ_EXAMPLES` sets the generated cases per operation (default 15; the full run uses 100).
Every other case of an operation that takes a body is replaced by a valid one naming a resource made for
it (`World.positive`), and every other case of an operation with a list-valued query parameter sends an
empty or repeated item (`World.list_variant`): so every operation is reached past its 404 (the answer
needed the resource), inference answers both of its media types, and an empty list item is 400. The
statuses each operation answered and the count of operations reached are printed at the end
(`pytest -rP` shows them).
"""

import io
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import requests
import schemathesis
from beanie import Document, init_beanie
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import checks

from fltraining.documents import DOCUMENT_MODELS, Model, Training, User
from fltraining.options import TrainingOptions
from fltraining.storage.database import make_client
from fltraining.weights import dump_tensors
from tests.fl_clients import GLOBAL_TENSORS as GRAPH_TENSORS
from tests.helpers import PASSWORD, small_model
from tests.onnx_graphs import graph
from tests.processes import ServiceProcess

EXAMPLES = int(os.environ.get("FLTRAINING_FUZZ_EXAMPLES", "15"))
# Placeholders for a resource made just for one request (a training in state I or O), replaced before sending.
FRESH = "fresh"
STARTED = "started"
PLACEHOLDERS = {FRESH, STARTED}
# Operations that use up the resource they name: a helped case names one made for it.
USING_UP = {"delete_model", "delete_training", "delete_dataset", "start_training", "patch_training", "add_clients",
            "remove_clients"}
# Marks a generated case to be sent without credentials (`@schema.given` would turn off the coverage phase).
ANONYMOUS = "X-Fuzz-Anonymous"
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.unsupported_method,  # an undocumented method is 405 with `Allow`
    checks.ignored_auth,  # wrong credentials are refused
]
# A case the test rewrote (World.prepare) is no longer what schemathesis generated: its record of which parts
# were generated invalid is stale, so only schemathesis' own cases take this check (the test asserts its own).
UNCHANGED_CASE_CHECKS = [*CHECKS, checks.negative_data_rejection]  # a request the schema refuses is 4xx
DOCUMENTS: list[type[Document]] = [User, Model, Training]
# Answers an operation can only give once it found the resource named (past its 404).
PAST_LOOKUP = {200, 201, 202, 204, 304, 403, 409, 412}
# Query values of a list-valued parameter, from two valid items a and b: (what is sent, whether it is 400).
LIST_VARIANTS: list[Callable[[str, str], tuple[str | list[str], bool]]] = [
    lambda a, b: ("", True),
    lambda a, b: ([a, ""], True),
    lambda a, b: (f"{a},,{b}", True),
    lambda a, b: (f"{a},", True),
    lambda a, b: ([a, a], False),
    lambda a, b: ([f"{a},{b}", b], False),
]
INPUT = [[0.5, 1.0], [2.0, -1.0]]  # two rows for graph()'s X (batch × 2)


def npy(array: np.ndarray) -> bytes:
    """An array as a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    """Arrays as an .npz file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def list_parameters(document: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """Per operation (`METHOD /path`), its list-valued query parameters and their allowed items."""
    found: dict[str, dict[str, list[str]]] = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                schema = parameter["schema"]
                arrays = [option for option in schema.get("anyOf", [schema]) if option.get("type") == "array"]
                if parameter["in"] == "query" and arrays:
                    items = arrays[0]["items"]
                    for option in [items, *items.get("anyOf", [])]:
                        if "$ref" in option:
                            option = document["components"]["schemas"][option["$ref"].rsplit("/", 1)[-1]]
                        if "enum" in option:
                            found.setdefault(f"{method.upper()} {path}", {})[parameter["name"]] = list(option["enum"])
    return found


@dataclass
class World:
    """The fuzzing user, a second user, their resources, and what the fuzz sent."""

    base_url: str
    http: requests.Session
    token: str = ""
    username: str = ""
    other_token: str = ""
    user_ids: list[str] = field(default_factory=list)
    # Ids of resources a rewritten case names (or placeholders for one made for it).
    real_ids: dict[str, list[str]] = field(default_factory=dict)
    graph_models: list[str] = field(default_factory=list)  # the fuzzer's ONNX models
    round_model: str = ""  # the global model of a running training the fuzzer takes part in
    swag_moments_model: str = ""  # a model with SWAG moments the fuzzer may read
    lists: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    exercised: Counter[str] = field(default_factory=Counter)
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    reached: Counter[str] = field(default_factory=Counter)  # cases answered past the operation's 404
    inference_types: Counter[str] = field(default_factory=Counter)  # content types of inference's 200s
    list_checks: Counter[str] = field(default_factory=Counter)  # empty / repeated list items sent, by kind

    def post(self, path: str, token: str | None = None, status: int = 201, **kwargs: Any) -> dict[str, Any]:
        """POST as a client would, asserting the expected status."""
        headers = {"Authorization": f"Token {token}"} if token else {}
        response = self.http.post(self.base_url + path, headers=headers, timeout=30, **kwargs)
        assert response.status_code == status, response.text
        return dict(response.json())

    def get(self, path: str, token: str) -> Any:
        """GET as a client would, asserting 200."""
        response = self.http.get(self.base_url + path, headers={"Authorization": f"Token {token}"}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def register(self) -> tuple[str, str, str]:
        """A new user's id, token and user name."""
        username = f"fuzz-{uuid.uuid4().hex[:12]}"
        body = self.post("/api/users/", json={"username": username, "password": PASSWORD})
        return str(body["id"]), str(body["token"]), username

    def new_model(self, token: str, content: bytes | None = None) -> str:
        """Upload a small model owned by the token's user."""
        files = {"model_file": ("model.pt", content or small_model(), "application/octet-stream")}
        return str(self.post("/api/models/", token, data={"name": "fuzz"}, files=files)["model_id"])

    def new_training(self, token: str, clients: list[str], **body: Any) -> str:
        """A training in state I on a new model."""
        body = {"model_id": self.new_model(token), "target_num_updates": 3, "clients": clients, **body}
        return str(self.post("/api/trainings/", token, json=body)["training_id"])

    def new_dataset(self) -> str:
        """A held-out data set of the fuzzer's."""
        x, y = np.array(INPUT, np.float32), np.array([0, 1], np.int64)
        files = {"dataset_file": ("data.npz", npz(x=x, y=y), "application/octet-stream")}
        return str(self.post("/api/datasets/", self.token, data={"name": "fuzz"}, files=files)["id"])

    def wait_for_state(self, training_id: str, state: str) -> None:
        """Poll the training until the round engine has moved it to `state`."""
        deadline = time.monotonic() + 60
        while (found := self.get(f"/api/trainings/{training_id}/", self.token)["state"]) != state:
            assert found not in {"C", "E"} and time.monotonic() < deadline, f"training at {found}, not {state}"
            time.sleep(0.05)  # polling the engine's progress, not papering over a race

    def swag_model(self, other_token: str) -> str:
        """A model with SWAG moments: a SWAG training the fuzzer takes part in, run to completion."""
        training_id = self.new_training(other_token, self.user_ids[:1], target_num_updates=1,
                                        uncertainty_method="SWAG", options={"skip_model_tests": True})
        self.post(f"/api/trainings/{training_id}/start/", other_token, status=202)
        model_id = str(self.get(f"/api/trainings/{training_id}/", self.token)["model"])
        self.post(f"/api/models/{model_id}/", self.token, data={"round": "0", "sample_size": "1"},
                  files={"model_file": ("m", small_model(), "application/octet-stream")})
        self.wait_for_state(training_id, "S")
        moment = ("m", small_model(), "application/octet-stream")
        self.post(f"/api/models/{model_id}/swag/", self.token, data={"round": "1", "sample_size": "1"},
                  files={"first_moment_file": moment, "second_moment_file": moment})
        self.wait_for_state(training_id, "C")
        return model_id

    def seed(self, document: dict[str, Any]) -> None:
        """Two users, each with a model and a training the other takes part in; ONNX models, a data set, a
        model with SWAG moments and a running round the fuzzer takes part in."""
        fuzzer_id, self.token, self.username = self.register()
        other_id, self.other_token, _ = self.register()
        self.user_ids = [fuzzer_id, other_id]
        theirs = self.new_training(self.other_token, [fuzzer_id])  # visible to the fuzzer, not its to change
        their_model = str(self.get(f"/api/trainings/{theirs}/", self.token)["model"])
        self.graph_models = [self.new_model(self.token, graph()), self.new_model(self.token, graph())]
        running = self.new_training(self.other_token, [fuzzer_id])
        self.post(f"/api/trainings/{running}/start/", self.other_token, status=202)
        self.round_model = str(self.get(f"/api/trainings/{running}/", self.token)["model"])
        self.real_ids = {
            "user_id": self.user_ids,
            # ONNX models too, so inference and ensembles reach their success paths.
            "model_id": [FRESH, self.new_model(self.token), their_model, *self.graph_models],
            "training_id": [FRESH, STARTED, self.new_training(self.token, [other_id]), theirs],
            "dataset_id": [FRESH, self.new_dataset()],
        }
        self.swag_moments_model = self.swag_model(self.other_token)
        self.lists = list_parameters(document)

    def resolve(self, name: str, value: Any) -> Any:
        """A placeholder replaced by a resource made for this request; any other value as it is."""
        if name == "model_id" and value == FRESH:
            return self.new_model(self.token)
        if name == "dataset_id" and value == FRESH:
            return self.new_dataset()
        if name == "training_id" and value in (FRESH, STARTED):
            training_id = self.new_training(self.token, self.user_ids[1:])
            if value == STARTED:
                self.post(f"/api/trainings/{training_id}/start/", self.token, status=202)
            return training_id
        return value

    def positive(self, case: schemathesis.Case) -> Any:
        """What a valid request of the case's operation sends (the body, after setting its path), or None
        for an operation whose generated cases need no help to get past 404."""
        operation = case.operation.definition.raw["operationId"]
        turn = self.exercised[case.operation.label]
        tensors = ("model_file", small_model(), "application/octet-stream")
        if operation == "infer":
            # Both media types, each answer format and each default, on a model with a graph.
            return_format = [None, "json", "binary"][turn // 2 % 3]
            if case.media_type == "multipart/form-data":
                body: dict[str, Any] = {"model_id": self.graph_models[0], "model_input": npy(np.array(INPUT))}
            else:
                body = {"model_id": self.graph_models[0], "model_input": INPUT}
            return body if return_format is None else {**body, "return_format": return_format}
        if operation == "attach_graph":  # a model of the graph's tensors, without a graph yet
            case.path_parameters["model_id"] = self.new_model(self.token, dump_tensors(GRAPH_TENSORS))
            return {"graph_file": graph()}
        if operation == "create_ensemble":
            return {"name": "fuzz ensemble", "models": self.graph_models}
        if operation == "upload_model":
            return {"name": "fuzz", "model_file": tensors[1]}
        if operation == "upload_update":
            case.path_parameters["model_id"] = self.round_model  # round 0's: 201 once, 409 after that
            return {"round": 0, "sample_size": 1, "model_file": tensors[1]}
        if operation == "upload_swag":
            case.path_parameters["model_id"] = self.round_model  # not in a SWAG round: 409
            return {"round": 0, "sample_size": 1, "first_moment_file": tensors[1], "second_moment_file": tensors[1]}
        if operation == "post_metrics":
            case.path_parameters["model_id"] = self.round_model
            return {"metric_names": ["accuracy"], "metric_values": [0.5]}
        if operation in {"add_clients", "remove_clients"}:
            return {"clients": self.user_ids[1:]}
        if operation == "patch_training":
            # A fresh training is at version 1: a random tag alone would only ever reach the 412 path.
            case.headers = {**(case.headers or {}), "If-Match": ['"1"', "*"][turn // 2 % 2]}
            return {"target_num_updates": 2}
        if operation == "create_training":
            return {"model_id": self.new_model(self.token), "target_num_updates": 2, "clients": self.user_ids[1:]}
        if operation == "upload_dataset":
            return {"name": "fuzz", "dataset_file": npz(x=np.array(INPUT, np.float32), y=np.array([0, 1]))}
        return None

    def list_variant(self, case: schemathesis.Case) -> bool | None:
        """A helped case of an operation with list-valued query parameters sends only one of them, with an
        empty or a repeated item; whether that must be 400 (None: the operation has none)."""
        lists = self.lists.get(case.operation.label)
        turn = self.exercised[case.operation.label]
        if not lists:
            return None
        name, items = sorted(lists.items())[turn // 2 % len(lists)]
        value, refused = LIST_VARIANTS[turn // 2 % len(LIST_VARIANTS)](items[0], items[1 % len(items)])
        case.query = {name: value}
        self.list_checks["empty" if refused else "repeated"] += 1
        return refused

    def positive_path(self, case: schemathesis.Case) -> None:
        """Name resources that exist in the case's path (a fresh one where the operation uses it up)."""
        operation = case.operation.definition.raw["operationId"]
        for name in case.path_parameters or {}:
            if operation in USING_UP:
                case.path_parameters[name] = FRESH
            elif operation == "cancel_training":
                case.path_parameters[name] = STARTED
            elif operation in {"swag_first", "swag_second"}:
                case.path_parameters[name] = self.swag_moments_model
            else:
                case.path_parameters[name] = next(value for value in self.real_ids[name] if value not in PLACEHOLDERS)

    def prepare(self, case: schemathesis.Case) -> tuple[dict[str, str], bool | None, bool]:
        """Create what the case's placeholders name (every other case made valid); the headers to send it with,
        whether an empty list item in its query must make it 400, and whether the case was rewritten."""
        label = case.operation.label
        anonymous = bool(case.headers and case.headers.pop(ANONYMOUS, None))
        probe = case.method.upper() != case.operation.method.upper()  # an unsupported-method probe: 405
        helped = not anonymous and not probe and self.exercised[label] % 2 == 0
        if helped:
            self.positive_path(case)
        for name, value in (case.path_parameters or {}).items():
            case.path_parameters[name] = self.resolve(name, value)
        if anonymous:
            return {}, None, False
        refused = None
        if helped:
            if (body := self.positive(case)) is not None:
                case.body = body
            refused = self.list_variant(case)
        operation = case.operation.definition.raw["operationId"]
        if operation == "delete_myself":
            # Deleting the fuzzing user would end every later case at 401: delete a user made for it.
            _, token, _ = self.register()
            self.new_training(token, self.user_ids)
            return {"Authorization": f"Token {token}"}, refused, helped
        if operation == "sign_out" and helped:
            # Signing out needs a sign-in's own token (the user's token is 400): one made for it.
            response = self.http.post(self.base_url + "/api/sessions/", auth=(self.username, PASSWORD), timeout=30)
            assert response.status_code == 201, response.text
            return {"Authorization": f"Token {response.json()['token']}"}, refused, helped
        return {"Authorization": f"Token {self.token}"}, refused, helped


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """`fltraining serve` on a fresh embedded store."""
    # No failed-login limits: `ignored_auth` sends wrong credentials on every operation, and the throttle's
    # 429 (tested in test_login_throttle.py) would answer them instead of 401.
    limits = {"FLTRAINING_LOGIN_FAILURE_LIMIT": "0", "FLTRAINING_LOGIN_ADDRESS_FAILURE_LIMIT": "0"}
    with ServiceProcess(tmp_path_factory.mktemp("fuzz"), env=limits) as process:
        yield process


@pytest.fixture(scope="module")
def world(service: ServiceProcess) -> Iterator[World]:
    """The users and resources the fuzz starts from."""
    with requests.Session() as http:
        state = World(base_url=service.base_url, http=http)
        state.seed(http.get(service.base_url + "/api/openapi.json", timeout=30).json())
        yield state


def add_anonymous_cases(schema: schemathesis.BaseSchema) -> None:
    """Mark about one case in ten to be sent without credentials. The test's other help (real resources,
    valid bodies) goes into the cases it rewrites itself (`World.prepare`): a generation hook that made an
    invalid part valid would leave schemathesis believing the case invalid."""

    def flatmap_headers(context: schemathesis.HookContext, headers: dict[str, Any] | None) -> Any:
        return st.integers(0, 9).map(lambda drawn: {**(headers or {}), ANONYMOUS: "1"} if drawn == 9 else headers)

    schema.hook("flatmap_headers")(flatmap_headers)


@pytest.fixture(scope="module")
def api_schema(service: ServiceProcess, world: World) -> schemathesis.BaseSchema:
    """The served OpenAPI document, set up to send requests to the service."""
    schema = schemathesis.openapi.from_url(service.base_url + "/api/openapi.json")
    schema.config.update(base_url=service.base_url)
    # Credentials come from the test: generated (wrong) ones would be failed logins, which get throttled.
    schema.config.generation.update(max_examples=EXAMPLES, database="none", with_security_parameters=False)
    add_anonymous_cases(schema)
    return schema


@pytest.fixture(autouse=True)
def node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """Schemathesis 4.32.5 reads and renames `Node._nodeid`, which pytest 9.2 no longer has."""
    request.node._nodeid = request.node.nodeid


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
def test_every_operation_answers_as_documented(case: schemathesis.Case, world: World) -> None:
    """No 5xx; status code, content type, headers and body as the spec documents them."""
    headers, refused, rewritten = world.prepare(case)
    response = case.call(headers=headers)
    label = case.operation.label
    world.exercised[label] += 1
    world.statuses[label][response.status_code] += 1
    if headers and response.status_code in PAST_LOOKUP:
        world.reached[label] += 1
    case.validate_response(response, checks=CHECKS if rewritten else UNCHANGED_CASE_CHECKS, headers=headers)
    if refused is not None:
        assert (response.status_code == 400) == refused, f"{case.query}: {response.status_code} {response.text[:200]}"
    if case.operation.definition.raw["operationId"] == "infer" and response.status_code == 200:
        body = case.body if isinstance(case.body, dict) else {}
        default = "binary" if case.media_type == "multipart/form-data" else "json"
        expected = "application/octet-stream" if body.get("return_format", default) == "binary" else "application/json"
        assert response.headers["content-type"][0].split(";")[0] == expected, (case.media_type, body)
        world.inference_types[f"{case.media_type} → {expected}"] += 1


async def test_store_still_valid_after_fuzzing(
    service: ServiceProcess, world: World, api_schema: schemathesis.BaseSchema
) -> None:
    """Every stored user, model and training still validates, and its references still resolve."""
    operations = {result.ok().label for result in api_schema.get_all_operations()}
    assert set(world.exercised) == operations, "every operation is exercised first (run the whole module)"
    for label, statuses in sorted(world.statuses.items()):
        print(f"{label}: {world.exercised[label]} cases, {world.reached[label]} past 404, "
              f"statuses {dict(sorted(statuses.items()))}")
    reached = {label for label in operations if world.reached[label]}
    print(f"operations reached past 404: {len(reached)} of {len(operations)}")
    print(f"inference answers: {dict(world.inference_types)}; list items sent: {dict(world.list_checks)}")
    assert reached == operations, f"never past 404: {sorted(operations - reached)}"
    assert len(world.inference_types) == 4, "JSON and multipart requests each answered in JSON and in binary"
    assert world.list_checks["empty"] and world.list_checks["repeated"]
    client = make_client(f"mongodb://127.0.0.1:{service.embedded_port}/?directConnection=true")
    try:
        database = client["fltraining"]
        await init_beanie(database=database, document_models=DOCUMENT_MODELS, skip_indexes=True)
        invalid: list[str] = []
        stored: dict[str, list[Any]] = {}
        for document in DOCUMENTS:
            name = document.Settings.name  # type: ignore[attr-defined]
            stored[name] = []
            async for raw in database[name].find():
                try:
                    stored[name].append(document.model_validate(raw))
                except ValidationError as error:
                    invalid.append(f"{name} {raw.get('_id')}: {error}")
        assert not invalid, "\n".join(invalid)
        users = {user.id for user in stored["users"]}
        models = {model.id for model in stored["models"]}
        for model in stored["models"]:
            assert model.owner in users, f"model {model.id} has no owner"
        for training in stored["trainings"]:
            TrainingOptions.model_validate(training.options)
            assert training.model in models, f"training {training.id} has no model"
            assert training.actor in users, f"training {training.id} has no actor"
            assert set(training.participants) <= users, f"training {training.id} has unknown participants"
    finally:
        await client.close()
