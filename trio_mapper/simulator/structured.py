"""Structured outputs: a reply that is a JSON instance of the request's schema, as a real model's would be.

Clients that ask for ``response_format`` (chat: ``json_schema`` or ``json_object``) or ``text.format``
(Responses) parse the reply: the SDK's ``.parse()`` helpers validate it against their pydantic model. Random
words would fail them, so the simulator builds, from the schema, a deterministic instance of it: every
property present, the first of each enum, ``anyOf`` and ``oneOf``, values that keep to the common string
formats and numeric bounds. It is what the simulator needs to exercise clients, not a JSON Schema validator.
"""

from __future__ import annotations

from typing import Any, Final

from .content import WORDS

#: Deeper than this (a recursive ``$ref``), a value is null: the instance stays finite.
MAX_DEPTH: Final = 12
#: What a schema-less ``json_object`` reply holds.
JSON_OBJECT_SCHEMA: Final = {"type": "object", "properties": {"answer": {"type": "string"}}}
_FORMATS: Final = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "email": "someone@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "duration": "P1D",
}


class SchemaError(ValueError):
    """The request's ``response_format``/``text.format`` has a shape the API would reject; ``param`` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def requested_schema(kind: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema the reply must follow, or None for a plain text reply.

    Raises:
        SchemaError: a structured format without its schema.
    """
    if kind == "chat":
        param, spec = "response_format", body.get("response_format")
    elif kind == "responses":
        text = body.get("text")
        param, spec = "text.format", text.get("format") if isinstance(text, dict) else None
    else:
        return None
    if spec is None:
        return None
    kind_of_format = spec.get("type") if isinstance(spec, dict) else None
    if kind_of_format == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind_of_format != "json_schema":
        if kind_of_format == "text":
            return None
        raise SchemaError(f"Invalid '{param}.type': expected 'text', 'json_object' or 'json_schema'.", param)
    assert isinstance(spec, dict)
    # Chat nests the schema under "json_schema"; Responses puts it beside "type".
    holder = spec.get("json_schema") if kind == "chat" else spec
    schema = holder.get("schema") if isinstance(holder, dict) else None
    if not isinstance(schema, dict):
        raise SchemaError(f"Missing required parameter: '{param}.schema'.", param)
    return schema


def instance(schema: dict[str, Any], seed: int) -> Any:
    """A JSON value that follows ``schema``; ``seed`` picks the words, so the same seed gives the same value."""
    return _Builder(schema, seed).value(schema, 0, frozenset())


class _Builder:
    def __init__(self, root: dict[str, Any], seed: int) -> None:
        self._root = root
        self._seed = seed

    def _word(self) -> str:
        self._seed += 7
        return WORDS[self._seed % len(WORDS)]

    def _resolve(self, reference: str) -> dict[str, Any]:
        target: Any = self._root
        for part in reference.removeprefix("#").split("/"):
            if part:
                target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        return target if isinstance(target, dict) else {}

    def value(self, schema: Any, depth: int, expanding: frozenset[str]) -> Any:
        """``expanding``: the references being built above this value; an option that would build one of them
        again (a recursive model's optional self) is passed over for the next, usually null."""
        if not isinstance(schema, dict) or depth > MAX_DEPTH:
            return None
        reference = schema.get("$ref")
        if isinstance(reference, str) and reference.startswith("#"):
            return self.value(self._resolve(reference), depth + 1, expanding | {reference})
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        for combination in ("anyOf", "oneOf", "allOf"):
            options = schema.get(combination)
            if isinstance(options, list) and options:
                fresh = [o for o in options if not (isinstance(o, dict) and o.get("$ref") in expanding)]
                return self.value((fresh or options)[0], depth + 1, expanding)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        if kind == "object":
            properties = schema.get("properties")
            if not isinstance(properties, dict):
                return {}
            return {name: self.value(sub, depth + 1, expanding) for name, sub in properties.items()}
        if kind == "array":
            prefix = schema.get("prefixItems")
            if isinstance(prefix, list) and prefix:
                return [self.value(item, depth + 1, expanding) for item in prefix]
            count = max(1, int(schema.get("minItems") or 0))
            if isinstance(schema.get("maxItems"), int):
                count = min(count, schema["maxItems"])
            return [self.value(schema.get("items", {}), depth + 1, expanding) for _ in range(count)]
        if kind == "string":
            return self._string(schema)
        if kind in ("integer", "number"):
            return self._number(schema, integer=kind == "integer")
        if kind == "boolean":
            return True
        return None

    def _string(self, schema: dict[str, Any]) -> str:
        if schema.get("format") in _FORMATS:
            return _FORMATS[schema["format"]]
        text = self._word()
        minimum = schema.get("minLength")
        while isinstance(minimum, int) and len(text) < minimum:
            text += " " + self._word()
        maximum = schema.get("maxLength")
        return text[:maximum] if isinstance(maximum, int) else text

    def _number(self, schema: dict[str, Any], *, integer: bool) -> int | float:
        value: float = 1 + self._seed % 97
        self._seed += 7
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if isinstance(low, int | float) and value <= low:
            value = low + 1
        if isinstance(high, int | float) and value >= high:
            value = high - 1 if not isinstance(low, int | float) or high - 1 > low else (low + high) / 2
        return int(value) if integer else float(value)
