"""Schemathesis over the served OpenAPI document: no 5xx, every answer as documented, the store still valid.

`FLTRAINING_FUZZ_EXAMPLES` sets the generated cases per operation (default 15; the full run uses 100).
The statuses each operation answered are printed at the end (`pytest -rP` shows them).
"""

import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
from tests.helpers import PASSWORD, small_model
from tests.onnx_graphs import graph
from tests.processes import ServiceProcess

EXAMPLES = int(os.environ.get("FLTRAINING_FUZZ_EXAMPLES", "15"))
# Placeholders for a resource made just for one request (a training in state I or O), replaced before sending.
FRESH = "fresh"
STARTED = "started"
# Marks a generated case to be sent without credentials (`@schema.given` would turn off the coverage phase).
ANONYMOUS = "X-Fuzz-Anonymous"
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.unsupported_method,  # an undocumented method is 405 with `Allow`
]
DOCUMENTS: list[type[Document]] = [User, Model, Training]


@dataclass
class World:
    """The fuzzing user, a second user, their resources, and what the fuzz sent."""

    base_url: str
    http: requests.Session
    token: str = ""
    user_ids: list[str] = field(default_factory=list)
    # Ids (or placeholders) that generated path parameters are sometimes replaced with.
    real_ids: dict[str, list[str]] = field(default_factory=dict)
    exercised: Counter[str] = field(default_factory=Counter)
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))

    def post(self, path: str, token: str | None = None, status: int = 201, **kwargs: Any) -> dict[str, Any]:
        """POST as a client would, asserting the expected status."""
        headers = {"Authorization": f"Token {token}"} if token else {}
        response = self.http.post(self.base_url + path, headers=headers, timeout=30, **kwargs)
        assert response.status_code == status, response.text
        return dict(response.json())

    def register(self) -> tuple[str, str]:
        """A new user's id and token."""
        username = f"fuzz-{uuid.uuid4().hex[:12]}"
        body = self.post("/api/users/", json={"username": username, "password": PASSWORD})
        return str(body["id"]), str(body["token"])

    def new_model(self, token: str, content: bytes | None = None) -> str:
        """Upload a small model owned by the token's user."""
        files = {"model_file": ("model.pt", content or small_model(), "application/octet-stream")}
        return str(self.post("/api/models/", token, data={"name": "fuzz"}, files=files)["model_id"])

    def new_training(self, token: str, clients: list[str]) -> str:
        """A training in state I on a new model."""
        body = {"model_id": self.new_model(token), "target_num_updates": 3, "clients": clients}
        return str(self.post("/api/trainings/", token, json=body)["training_id"])

    def seed(self) -> None:
        """Two users, each with a model and a training the other takes part in."""
        fuzzer_id, self.token = self.register()
        other_id, other_token = self.register()
        self.user_ids = [fuzzer_id, other_id]
        theirs = self.new_training(other_token, [fuzzer_id])  # visible to the fuzzer, not its to change
        their_model = str(self.http.get(f"{self.base_url}/api/trainings/{theirs}/", timeout=30,
                                        headers={"Authorization": f"Token {self.token}"}).json()["model"])
        self.real_ids = {
            "user_id": self.user_ids,
            # An ONNX model too, so inference and ensembles reach their success paths.
            "model_id": [FRESH, self.new_model(self.token), their_model, self.new_model(self.token, graph())],
            "training_id": [FRESH, STARTED, self.new_training(self.token, [other_id]), theirs],
        }

    def resolve(self, name: str, value: Any) -> Any:
        """A placeholder replaced by a resource made for this request; any other value as it is."""
        if name == "model_id" and value == FRESH:
            return self.new_model(self.token)
        if name == "training_id" and value in (FRESH, STARTED):
            training_id = self.new_training(self.token, self.user_ids[1:])
            if value == STARTED:
                self.post(f"/api/trainings/{training_id}/start/", self.token, status=202)
            return training_id
        return value

    def prepare(self, case: schemathesis.Case) -> dict[str, str]:
        """Create what the case's placeholders name; the headers to send it with."""
        for name, value in (case.path_parameters or {}).items():
            case.path_parameters[name] = self.resolve(name, value)
        if isinstance(case.body, dict) and "model_id" in case.body:
            case.body["model_id"] = self.resolve("model_id", case.body["model_id"])
        if case.headers and case.headers.pop(ANONYMOUS, None):
            return {}
        if case.operation.definition.raw["operationId"] == "delete_myself":
            # Deleting the fuzzing user would end every later case at 401: delete a user made for it.
            _, token = self.register()
            self.new_training(token, self.user_ids)
            return {"Authorization": f"Token {token}"}
        return {"Authorization": f"Token {self.token}"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """`fltraining serve` on a fresh embedded store."""
    with ServiceProcess(tmp_path_factory.mktemp("fuzz")) as process:
        yield process


@pytest.fixture(scope="module")
def world(service: ServiceProcess) -> Iterator[World]:
    """The users and resources the fuzz starts from."""
    with requests.Session() as http:
        state = World(base_url=service.base_url, http=http)
        state.seed()
        yield state


def add_real_values(schema: schemathesis.BaseSchema, state: World) -> None:
    """Make generated requests sometimes name existing resources, so success paths are reached too."""
    path_ids = state.real_ids

    def flatmap_path_parameters(context: schemathesis.HookContext, parameters: dict[str, Any] | None) -> Any:
        if not parameters:
            return st.just(parameters)
        return st.fixed_dictionaries({
            name: st.one_of(st.just(value), st.sampled_from(path_ids.get(name, [value])))
            for name, value in parameters.items()
        })

    def flatmap_headers(context: schemathesis.HookContext, headers: dict[str, Any] | None) -> Any:
        choices = [headers or {}]
        if headers and "If-Match" in headers:
            without = {name: value for name, value in headers.items() if name != "If-Match"}
            # A fresh training is at version 1; random tags alone would only ever reach the 412 path.
            choices += [without, {**without, "If-Match": '"1"'}, {**without, "If-Match": "*"}]
        # About one case in ten goes without credentials.
        return st.tuples(st.sampled_from(choices), st.integers(0, 9)).map(
            lambda drawn: {**drawn[0], ANONYMOUS: "1"} if drawn[1] == 9 else drawn[0]
        )

    def flatmap_body(context: schemathesis.HookContext, body: Any) -> Any:
        if not isinstance(body, dict):
            return st.just(body)
        replacements: dict[str, Any] = {}
        if "clients" in body:
            replacements["clients"] = st.lists(st.sampled_from(state.user_ids), max_size=2)
        if "model_id" in body:
            replacements["model_id"] = st.sampled_from(path_ids["model_id"])
        if isinstance(target := body.get("target_num_updates"), float) and target.is_integer():
            # JSON Schema counts 3.0 as an integer; the service takes only JSON integers (400 otherwise).
            replacements["target_num_updates"] = st.just(int(target))
        if not replacements:
            return st.just(body)
        real = st.fixed_dictionaries(replacements).map(lambda values: {**body, **values})
        return st.one_of(st.just(body), real)

    schema.hook("flatmap_path_parameters")(flatmap_path_parameters)
    schema.hook("flatmap_headers")(flatmap_headers)
    schema.hook("flatmap_body")(flatmap_body)


@pytest.fixture(scope="module")
def api_schema(service: ServiceProcess, world: World) -> schemathesis.BaseSchema:
    """The served OpenAPI document, set up to send requests to the service."""
    schema = schemathesis.openapi.from_url(service.base_url + "/api/openapi.json")
    schema.config.update(base_url=service.base_url)
    # Credentials come from the test: generated (wrong) ones would be failed logins, which get throttled.
    schema.config.generation.update(max_examples=EXAMPLES, database="none", with_security_parameters=False)
    add_real_values(schema, world)
    return schema


@pytest.fixture(autouse=True)
def node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """Schemathesis 4.32.5 reads and renames `Node._nodeid`, which pytest 9.2 no longer has."""
    request.node._nodeid = request.node.nodeid


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
def test_every_operation_answers_as_documented(case: schemathesis.Case, world: World) -> None:
    """No 5xx; status code, content type, headers and body as the spec documents them."""
    headers = world.prepare(case)
    response = case.call(headers=headers)
    world.exercised[case.operation.label] += 1
    world.statuses[case.operation.label][response.status_code] += 1
    case.validate_response(response, checks=CHECKS, headers=headers)


async def test_store_still_valid_after_fuzzing(
    service: ServiceProcess, world: World, api_schema: schemathesis.BaseSchema
) -> None:
    """Every stored user, model and training still validates, and its references still resolve."""
    operations = {result.ok().label for result in api_schema.get_all_operations()}
    assert set(world.exercised) == operations, "every operation is exercised first (run the whole module)"
    for label, statuses in sorted(world.statuses.items()):
        print(f"{label}: {world.exercised[label]} cases, statuses {dict(sorted(statuses.items()))}")
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
