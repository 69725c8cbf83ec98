"""Which JSON schemas structured output can enforce exactly: the first keyword it cannot, or None.

xgrammar (0.2.9) compiles many schemas it does not fully enforce: its matcher accepts documents that
break the keyword, so a 200 would carry output that fails ``jsonschema.validate``. Each rule below was
found by testing its matcher on a document that breaks the keyword (tests/unit/server/engine/
test_guided_schema.py keeps those probes, so an xgrammar upgrade that changes them is seen), not
from its documentation:

- ignored everywhere: ``not``, ``if``/``then``/``else``, ``dependent*``, ``uniqueItems``,
  ``contains``/``minContains``/``maxContains``, ``multipleOf`` on numbers (enforced on integers),
  an external ``$ref`` (any document passes), ``allOf`` of more than one schema;
- ``patternProperties``: keys may repeat (``{"x": 1, "x": 2}``);
- ``required`` naming a property ``properties`` does not define: never generated;
- ``oneOf``: treated as ``anyOf``, so a document matching two branches passes;
- keywords beside ``$ref``, ``anyOf``/``oneOf``, ``enum``/``const``: ignored (the branch or the value
  list alone is compiled);
- a type's keywords (``minimum``, ``maxLength``, ``minItems``, ``required``, ...) without ``type``:
  ignored, except an object's beside ``properties`` (from which xgrammar infers the object);
- ``pattern`` or ``format`` beside another string keyword: only the pattern (format) is enforced,
  ``minLength``/``maxLength`` are dropped (found by the schema corpus test).

What is refused is refused before any compile, with the keyword and where it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema

IGNORED_KEYWORDS = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "patternProperties",
    }
)
"""Keywords refused wherever they appear."""

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "$comment",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$id",
        "$schema",
        "$defs",
        "definitions",
        "$anchor",
        "format",  # enforced by xgrammar, but jsonschema only annotates it unless asked
        "contentEncoding",
        "contentMediaType",
        "nullable",
    }
)
"""Keywords that constrain nothing jsonschema validates: allowed beside anything."""

_TYPE_KEYWORDS: dict[str, frozenset[str]] = {
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "string": frozenset({"minLength", "maxLength", "pattern"}),
    "array": frozenset({"items", "prefixItems", "minItems", "maxItems", "unevaluatedItems"}),
    "object": frozenset(
        {"properties", "required", "additionalProperties", "minProperties", "maxProperties"}
        | {"propertyNames", "unevaluatedProperties"}
    ),
}
_SUBSCHEMA = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_JSON_TYPES = {
    "null": type(None),
    "boolean": bool,
    "string": str,
    "array": list,
    "object": dict,
}


def unenforced(schema: Any) -> str | None:
    """The first thing in ``schema`` structured output would not enforce, as "'keyword' (at path)",
    or None when every keyword is enforced."""
    for path, node in subschemas(schema, "#"):
        problem = _node_problem(node)
        if problem is not None:
            return f"{problem} (at {path})"
    return None


def subschemas(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object in a JSON schema (keywords' positions only: a property named "not" is not
    the keyword), with its JSON-pointer-like path. The caller bounds the depth (serving does)."""
    if not isinstance(node, dict):
        return
    yield path, node
    for key in _SUBSCHEMA:
        yield from subschemas(node.get(key), f"{path}/{key}")
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, child in enumerate(node[key]):
                yield from subschemas(child, f"{path}/{key}/{i}")
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, child in node[key].items():
                yield from subschemas(child, f"{path}/{key}/{name}")


def _node_problem(node: dict[str, Any]) -> str | None:
    found = sorted(IGNORED_KEYWORDS & node.keys())
    if found:
        return f"'{found[0]}'"
    for check in (_ref_problem, _all_of_problem, _combinator_problem, _values_problem, _typed_problem):
        problem = check(node)
        if problem is not None:
            return problem
    return None


def _ref_problem(node: dict[str, Any]) -> str | None:
    ref = node.get("$ref")
    if ref is None:
        return None
    if not isinstance(ref, str) or not ref.startswith("#"):
        return f"'$ref' to another document ({ref!r}): only local references ('#/...') are resolved"
    beside = sorted(node.keys() - ANNOTATIONS - {"$ref"})
    if beside:
        return f"'{beside[0]}' beside '$ref' (move it into the referenced schema)"
    return None


def _all_of_problem(node: dict[str, Any]) -> str | None:
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        return "'allOf' with more than one schema"
    return None


def _combinator_problem(node: dict[str, Any]) -> str | None:
    """anyOf/oneOf/allOf: the branches alone are compiled, so a keyword beside them would be ignored;
    oneOf is compiled as anyOf, so its branches must exclude each other."""
    for key in ("anyOf", "oneOf", "allOf"):
        if key not in node:
            continue
        beside = sorted(node.keys() - ANNOTATIONS - {key, "type"})
        if beside:
            return f"'{beside[0]}' beside '{key}' (move it into each branch)"
        if "type" in node and not _branches_typed_within(node[key], node["type"]):
            return f"'type' beside '{key}' whose branches do not each declare a type within it"
    one_of = node.get("oneOf")
    if isinstance(one_of, list) and len(one_of) > 1 and not _mutually_exclusive(one_of):
        return "'oneOf' whose branches may overlap (enforced as 'anyOf'; make them exclusive or send 'anyOf')"
    return None


def _declared_types(schema: Any) -> set[str] | None:
    """The JSON types a branch allows (number includes integer), from its type, const or enum; None if
    it does not say."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema.get("enum")
        if not isinstance(values, list):
            return None
        return {_type_of(v) for v in values}
    declared = schema.get("type")
    if declared is None:
        return None
    types = {declared} if isinstance(declared, str) else set(declared)
    if "number" in types:
        types.add("integer")
    return types


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    return next(name for name, kind in _JSON_TYPES.items() if isinstance(value, kind))


def _branches_typed_within(branches: Any, declared: Any) -> bool:
    allowed = {declared} if isinstance(declared, str) else set(declared)
    if "number" in allowed:
        allowed.add("integer")
    types = [_declared_types(b) for b in branches] if isinstance(branches, list) else [None]
    return all(t is not None and t <= allowed for t in types)


def _mutually_exclusive(branches: list[Any]) -> bool:
    """True when no document can match two branches: their types are disjoint, or every branch is an
    object whose one shared required property has a distinct const in each (a discriminator)."""
    types = [_declared_types(b) for b in branches]
    if all(t is not None for t in types):
        seen: set[str] = set()
        disjoint = True
        for t in types:
            assert t is not None
            disjoint = disjoint and not (seen & t)
            seen |= t
        if disjoint:
            return True
    return _has_discriminator(branches)


def _has_discriminator(branches: list[Any]) -> bool:
    if not all(isinstance(b, dict) and isinstance(b.get("properties"), dict) for b in branches):
        return False
    shared = set.intersection(*(set(b.get("required") or ()) for b in branches))
    for name in sorted(shared):
        consts = [b["properties"].get(name, {}) for b in branches]
        if all(isinstance(c, dict) and "const" in c for c in consts):
            values = [repr(c["const"]) for c in consts]
            if len(set(values)) == len(values):
                return True
    return False


def _values_problem(node: dict[str, Any]) -> str | None:
    """enum/const: xgrammar compiles the value list alone, so every value must satisfy the keywords
    beside it (jsonschema decides)."""
    key = "const" if "const" in node else "enum" if "enum" in node else None
    if key is None:
        return None
    values = [node["const"]] if key == "const" else node["enum"]
    rest = {k: v for k, v in node.items() if k not in ("const", "enum")}
    if not (rest.keys() - ANNOTATIONS):
        return None
    validator = jsonschema.validators.validator_for(rest)(rest)
    for value in values if isinstance(values, list) else []:
        if not validator.is_valid(value):
            return f"'{key}' value {value!r} that the keywords beside it forbid"
    return None


def _typed_problem(node: dict[str, Any]) -> str | None:
    """A type's keywords need that type declared (xgrammar infers only an object from properties);
    multipleOf is enforced on integers alone; required must name defined properties."""
    declared = node.get("type")
    types = {declared} if isinstance(declared, str) else set(declared or ())
    if "integer" in types:
        types.add("number")
    combined = any(k in node for k in ("$ref", "anyOf", "oneOf", "allOf", "enum", "const"))
    if not combined:
        inferred_object = "object" in types or (not types and "properties" in node)
        for kind, keywords in _TYPE_KEYWORDS.items():
            used = sorted(keywords & node.keys())
            if used and kind not in types and not (kind == "object" and inferred_object):
                return f"'{used[0]}' without 'type': '{kind}'"
    string_keywords = sorted({"pattern", "format", "minLength", "maxLength"} & node.keys())
    for alone in ("pattern", "format"):
        if alone in string_keywords and len(string_keywords) > 1:
            other = next(k for k in string_keywords if k != alone)
            return (
                f"'{other}' beside '{alone}' (only the {alone} is enforced: fold the length into a pattern)"
            )
    multiple = node.get("multipleOf")
    if multiple is not None and (declared != "integer" or not isinstance(multiple, int)):
        return "'multipleOf' on a non-integer (enforced only as an integer multiple of an integer)"
    required = node.get("required")
    if isinstance(required, list):
        properties = node.get("properties")
        defined: dict[str, Any] = properties if isinstance(properties, dict) else {}
        missing = [name for name in required if name not in defined]
        if missing:
            return f"'required' naming {missing[0]!r}, which 'properties' does not define"
    return None
