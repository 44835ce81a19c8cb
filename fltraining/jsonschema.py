"""Helpers for JSON Schema documents produced by pydantic."""

from typing import Any


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Return the schema with every local `$ref` replaced by its definition."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [resolve(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return resolve(merged)
        return {k: resolve(v) for k, v in node.items() if k != "$defs"}

    return resolve(schema)
