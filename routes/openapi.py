"""The OpenAPI 3.1 document, generated from the endpoint table and the pydantic schemas."""

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

import fltraining
from fltraining.schemas.common import ErrorBody
from routes.table import Endpoint, documented_path

REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"{(\w+)}")
_STATUS_TEXT = {
    200: "OK", 201: "Created", 202: "Accepted", 400: "Invalid body or query", 401: "No or bad credentials",
    403: "Not allowed", 404: "Unknown resource", 409: "Conflict with the current state",
    412: "If-Match does not match", 413: "Body too large", 415: "Wrong content type",
    429: "Too many requests", 503: "Database unreachable",
}
SECURITY = [{"tokenAuth": []}, {"bearerAuth": []}, {"basicAuth": []}]


def _models(endpoints: list[Endpoint]) -> list[tuple[type[BaseModel], str]]:
    """Every schema the endpoints use, with the mode it is used in."""
    found: list[tuple[type[BaseModel], str]] = [(ErrorBody, "serialization")]
    for endpoint in endpoints:
        for model in (endpoint.body, endpoint.multipart):
            if model is not None:
                found.append((model, "validation"))
        for answer in endpoint.responses.values():
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
        params.append({"name": name, "in": "query", "required": False, "schema": prop,
                       "style": "form", "explode": True})
    return params


def build_openapi(endpoints: list[Endpoint]) -> dict[str, Any]:
    """Build the whole document."""
    keys, schema = models_json_schema(_models(endpoints), ref_template=REF)
    refs = {key: value for key, value in keys.items()}
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        path = documented_path(endpoint.path)
        operation: dict[str, Any] = {
            "summary": endpoint.summary,
            "operationId": endpoint.handler.__name__,
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
        if endpoint.body is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": refs[(endpoint.body, "validation")]}}}
        if endpoint.multipart is not None:
            form = dict(refs[(endpoint.multipart, "validation")])
            operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
                "allOf": [form, {"type": "object", "required": ["model_file"],
                                 "properties": {"model_file": {"type": "string", "contentMediaType": "application/octet-stream"}}}]}}}}
        for status, answer in endpoint.responses.items():
            response: dict[str, Any] = {"description": _STATUS_TEXT.get(status, "OK")}
            if isinstance(answer, list):
                response["content"] = {"application/json": {"schema": {
                    "type": "array", "items": refs[(answer[0], "serialization")]}}}
            elif isinstance(answer, type):
                response["content"] = {"application/json": {"schema": refs[(answer, "serialization")]}}
            elif isinstance(answer, str):
                response["content"] = {answer: {"schema": {"type": "string", "contentMediaType": answer}}}
            if status in endpoint.headers:
                response["headers"] = {h: {"schema": {"type": "string"}} for h in endpoint.headers[status]}
            operation["responses"][str(status)] = response
        errors = set(endpoint.errors)
        if not endpoint.public:
            errors.add(401)
            operation["security"] = SECURITY
        error_ref = refs[(ErrorBody, "serialization")]
        for status in sorted(errors):
            response = {"description": _STATUS_TEXT[status], "content": {"application/json": {"schema": error_ref}}}
            if status == 401:
                response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
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
