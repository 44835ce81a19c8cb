"""MongoDB `$jsonSchema` validators generated from the document models."""

from typing import Any

from beanie import Document

from fltraining.jsonschema import inline_refs

_DROPPED = {"title", "description", "default", "examples", "format", "discriminator"}
_TYPE_TO_BSON: dict[str, list[str]] = {
    "integer": ["int", "long"],
    "number": ["double", "int", "long", "decimal"],
    "boolean": ["bool"],
    "array": ["array"],
    "object": ["object"],
    "null": ["null"],
}
_FORMAT_TO_BSON = {"uuid": ["binData"], "date-time": ["date"]}


def _bson_types(node: dict[str, Any]) -> list[str]:
    """Map a JSON Schema `type` (and `format`) to MongoDB bsonType names."""
    kind = node["type"]
    if kind == "string":
        return _FORMAT_TO_BSON.get(node.get("format", ""), ["string"])
    if kind == "string" and "pattern" in node:
        return ["string"]
    return _TYPE_TO_BSON[kind]


def _convert(node: Any) -> Any:
    """Convert one JSON Schema node into its `$jsonSchema` equivalent."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "type":
            out["bsonType"] = _bson_types(node)
        elif key == "properties":
            out["properties"] = {name: _convert(sub) for name, sub in value.items()}
        elif key in {"items", "additionalProperties"}:
            out[key] = _convert(value)
        elif key in {"anyOf", "oneOf", "allOf"}:
            out[key] = [_convert(sub) for sub in value]
        elif key == "enum":
            out["enum"] = list(value)
        elif key == "const":
            out["enum"] = [value]
        elif key in {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
                     "maxLength", "pattern", "minItems", "maxItems", "uniqueItems", "required",
                     "minProperties", "maxProperties"}:
            out[key] = value
    if "format" in node and node.get("type") == "string" and out.get("bsonType") != ["string"]:
        # A uuid or date is not a string in BSON; string constraints no longer apply.
        for key in ("minLength", "maxLength", "pattern"):
            out.pop(key, None)
    return out


def bson_schema(document: type[Document]) -> dict[str, Any]:
    """Return the `$jsonSchema` of a document model, as the database should enforce it."""
    schema = _convert(inline_refs(document.model_json_schema(by_alias=True)))
    schema["properties"].pop("revision_id", None)
    schema["required"] = sorted(set(schema.get("required", [])) | set(schema["properties"]))
    schema.pop("additionalProperties", None)
    return schema


def collection_validator(document: type[Document]) -> dict[str, Any]:
    """Return the `validator` option of a document's collection: its `$jsonSchema`, and the rule across
    fields a JSON Schema cannot state (`stored_rule`, an aggregation expression), where it has one."""
    validator: dict[str, Any] = {"$jsonSchema": bson_schema(document)}
    rule = getattr(document, "stored_rule", None)
    if rule is not None:
        validator["$expr"] = rule
    return validator
