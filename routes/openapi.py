"""The OpenAPI 3.1 document, generated from the endpoint table and the pydantic schemas."""

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

import fltraining
from fltraining.schemas.common import ErrorBody
from routes.table import Answer, Endpoint, documented_path

REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"{(\w+)}")
_STATUS_TEXT = {
    200: "OK", 201: "Created", 202: "Accepted", 304: "Not modified: If-None-Match names the current version",
    400: "Invalid body or query", 401: "No or bad credentials",
    403: "Not allowed", 404: "Unknown resource", 408: "Body did not arrive in time",
    409: "Conflict with the current state", 412: "If-Match does not match", 413: "Body too large",
    415: "Wrong content type", 429: "Too many requests", 503: "Database unreachable, or inference busy (Retry-After)",
    507: "No room to store the file right now (nothing was kept)",
}
SECURITY = [{"tokenAuth": []}, {"bearerAuth": []}, {"basicAuth": []}]
_ERROR_HEADERS = {401: "WWW-Authenticate", 429: "Retry-After"}
_HEADER_SCHEMAS: dict[str, dict[str, Any]] = {
    "ETag": {"type": "string", "pattern": '^(W/)?"[^"]*"$'},
    "Retry-After": {"type": "integer", "minimum": 0},
    "WWW-Authenticate": {"type": "string", "const": "Token"},
    "X-Total-Count": {"type": "integer", "minimum": 0},
}


def _header(name: str) -> dict[str, Any]:
    """A response header the service always sends."""
    return {"required": True, "schema": _HEADER_SCHEMAS.get(name, {"type": "string"})}


def _models(endpoints: list[Endpoint]) -> list[tuple[type[BaseModel], str]]:
    """Every schema the endpoints use, with the mode it is used in."""
    found: list[tuple[type[BaseModel], str]] = [(ErrorBody, "serialization")]
    for endpoint in endpoints:
        for model in (endpoint.body, endpoint.multipart):
            if model is not None:
                found.append((model, "validation"))
        for answers in endpoint.responses.values():
            for answer in answers if isinstance(answers, tuple) else (answers,):
                if isinstance(answer, list):
                    found.extend((model, "serialization") for model in answer)
                elif isinstance(answer, type):
                    found.append((answer, "serialization"))
    return list(dict.fromkeys(found))


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """Query parameters of a query model, one per field."""
    schema = model.model_json_schema(ref_template=REF)
    params = []
    for name, prop in schema["properties"].items():
        if "default" in prop and prop["default"] is None:
            prop = {key: value for key, value in prop.items() if key != "default"}  # absent, not null
        params.append({"name": name, "in": "query", "required": False, "schema": prop,
                       "style": "form", "explode": True})
    return params


def _definition(schema: dict[str, Any], ref: dict[str, str]) -> dict[str, Any]:
    """The component schema a `$ref` names."""
    return dict(schema["$defs"][ref["$ref"].rsplit("/", 1)[-1]])


def _multipart(form: dict[str, Any], files: tuple[str, ...]) -> dict[str, Any]:
    """A multipart media type: the form's fields plus its files; arrays are repeated parts, other non-strings JSON text."""
    # One object, not allOf with the form's schema: that forbids extra keys, so would forbid the files too.
    file = {"type": "string", "contentMediaType": "application/octet-stream"}
    properties = {**form["properties"], **dict.fromkeys(files, file)}
    encoding = {name: {"contentType": "application/json"} for name, prop in form["properties"].items()
                if prop.get("type") not in {"string", "array"}}
    encoding.update({name: {"contentType": "application/octet-stream"} for name in files})
    return {"schema": {**form, "properties": properties, "required": [*form.get("required", []), *files]},
            "encoding": encoding}


def _content(answer: Answer, refs: dict[tuple[type[BaseModel], str], Any]) -> dict[str, Any]:
    """The media type (and its schema) one answer is sent as; none for an answer without a body."""
    if isinstance(answer, list):
        return {"application/json": {"schema": {"type": "array", "items": refs[(answer[0], "serialization")]}}}
    if isinstance(answer, type):
        return {"application/json": {"schema": refs[(answer, "serialization")]}}
    if isinstance(answer, str):
        return {answer: {"schema": {"type": "string", "contentMediaType": answer}}}
    return {}


def build_openapi(endpoints: list[Endpoint]) -> dict[str, Any]:
    """Build the whole document."""
    keys, schema = models_json_schema(_models(endpoints), ref_template=REF)
    refs = {key: value for key, value in keys.items()}
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        path = documented_path(endpoint.path)
        operation: dict[str, Any] = {
            "summary": endpoint.summary,
            "operationId": endpoint.operation_id or endpoint.handler.__name__,
            "tags": [endpoint.tag],
            "responses": {},
        }
        if endpoint.description:
            operation["description"] = endpoint.description
        parameters: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
            for name in _PARAM.findall(endpoint.path)
        ]
        if endpoint.query is not None:
            parameters.extend(_query_parameters(endpoint.query))
        parameters.extend(
            {"name": header, "in": "header", "required": False, "schema": {"type": "string"}}
            for header in endpoint.request_headers
        )
        if parameters:
            operation["parameters"] = parameters
        body: dict[str, Any] = {}
        if endpoint.body is not None:
            body["application/json"] = {"schema": refs[(endpoint.body, "validation")]}
        if endpoint.multipart is not None:
            form = _definition(schema, refs[(endpoint.multipart, "validation")])
            body["multipart/form-data"] = _multipart(form, endpoint.files)
        if body:
            operation["requestBody"] = {"required": True, "content": body}
        for status, answers in endpoint.responses.items():
            response: dict[str, Any] = {"description": _STATUS_TEXT.get(status, "OK")}
            content: dict[str, Any] = {}
            for answer in answers if isinstance(answers, tuple) else (answers,):
                content |= _content(answer, refs)
            if content:
                response["content"] = content
            if status in endpoint.headers:
                response["headers"] = {name: _header(name) for name in endpoint.headers[status]}
            operation["responses"][str(status)] = response
        errors = set(endpoint.errors)
        if endpoint.body is not None or endpoint.multipart is not None:
            errors.add(408)  # a client that stops sending its body
        if not endpoint.public:
            errors.update({401, 429})  # 429: too many failed logins from the caller's address
            operation["security"] = SECURITY
        error_ref = refs[(ErrorBody, "serialization")]
        for status in sorted(errors):
            response = {"description": _STATUS_TEXT[status], "content": {"application/json": {"schema": error_ref}}}
            if status in _ERROR_HEADERS:
                response["headers"] = {_ERROR_HEADERS[status]: _header(_ERROR_HEADERS[status])}
            operation["responses"][str(status)] = response
        paths.setdefault(path, {})[endpoint.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "fltraining", "version": fltraining.__version__,
                 "description": "Training management of a federated learning server (DLR-compatible)."},
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {
                "tokenAuth": {"type": "apiKey", "in": "header", "name": "Authorization",
                              "description": "`Token <key>`"},
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "basicAuth": {"type": "http", "scheme": "basic",
                              "description": "user:password, or <key>: with an empty password"},
            },
        },
    }
