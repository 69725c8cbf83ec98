"""Which schema keywords structured output refuses, and the xgrammar behaviour behind each rule.

Every refused case carries a document that breaks the schema and that xgrammar's matcher accepts
(the reason to refuse it); every allowed case one that xgrammar rejects. If an xgrammar upgrade
starts enforcing a refused keyword, the first test fails and the rule can go.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import referencing.exceptions
import xgrammar
from xgrammar.testing import _is_grammar_accept_string

from lorayard.server.engine.guided import MAX_WHITESPACE
from lorayard.server.engine.guided_schema import unenforced

INT = {"type": "integer"}
# name: (schema, a document jsonschema rejects, the keyword the refusal names)
REFUSED = {
    "multipleOf on a number": ({"type": "number", "multipleOf": 0.5}, "0.3", "multipleOf"),
    "contains": ({"type": "array", "items": INT, "contains": {"const": 3}}, "[1]", "contains"),
    "required, additionalProperties false": (
        {"type": "object", "properties": {"a": INT}, "required": ["b"], "additionalProperties": False},
        '{"a": 1}',
        "required",
    ),
    "required, open object": (
        {"type": "object", "properties": {"a": INT}, "required": ["b"]},
        '{"a": 1}',
        "required",
    ),
    "oneOf overlapping": ({"oneOf": [INT, {"type": "number"}]}, "1", "oneOf"),
    "external $ref": ({"$ref": "http://example.com/x.json"}, "1", "$ref"),
    "relative $ref": ({"$ref": "other.json#/a"}, '"x"', "$ref"),
    "keyword beside $ref": ({"$defs": {"a": INT}, "$ref": "#/$defs/a", "minimum": 5}, "1", "minimum"),
    "keyword beside anyOf": ({"minimum": 3, "anyOf": [INT]}, "1", "minimum"),
    "required beside anyOf": (
        {"type": "object", "required": ["a"], "anyOf": [{"properties": {"a": INT}}]},
        "{}",
        "required",
    ),
    "enum value the type forbids": ({"type": "string", "enum": ["a", 1]}, "1", "enum"),
    "const the minimum forbids": ({"const": 1, "minimum": 3}, "1", "const"),
    "minimum without type": ({"minimum": 3}, "1", "minimum"),
    "maxLength without type": ({"maxLength": 2}, '"abc"', "maxLength"),
    "minItems without type": ({"minItems": 2}, "[1]", "minItems"),
    "required without type": ({"required": ["a"]}, "{}", "required"),
    "allOf of two": ({"allOf": [INT, {"minimum": 3}]}, "1", "allOf"),
    "maxLength beside pattern": (
        {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3},
        '"abcdef"',
        "maxLength",
    ),
    "minLength beside pattern": (
        {"type": "string", "pattern": "^[a-z]+$", "minLength": 3},
        '"ab"',
        "minLength",
    ),
    "maxLength beside format": (
        {"type": "string", "format": "uri", "maxLength": 5},
        '"http://abcdef.com"',
        "maxLength",
    ),
}
# Refused although xgrammar's matcher may reject the probe: duplicate keys pass json.loads (the last
# wins), so jsonschema cannot see what xgrammar allowed.
REFUSED_DUPLICATE_KEYS = {
    "patternProperties": ({"type": "object", "patternProperties": {"^x": INT}}, '{"x": 1, "x": 2}'),
}
ALLOWED = {
    "multipleOf on an integer": ({"type": "integer", "multipleOf": 5}, "7"),
    "local $ref": ({"$defs": {"a": INT}, "$ref": "#/$defs/a", "description": "d"}, '"x"'),
    "oneOf with disjoint types": ({"oneOf": [INT, {"type": "string"}]}, "true"),
    "oneOf with a discriminator": (
        {
            "oneOf": [
                {"type": "object", "properties": {"k": {"const": "a"}, "x": INT}, "required": ["k", "x"]},
                {"type": "object", "properties": {"k": {"const": "b"}}, "required": ["k"]},
            ]
        },
        '{"k": "c"}',
    ),
    "anyOf with type": ({"type": ["integer", "string"], "anyOf": [INT, {"type": "string"}]}, "true"),
    "enum within its type": ({"type": "string", "enum": ["a", "b"]}, '"c"'),
    "object inferred from properties": ({"properties": {"a": INT}, "required": ["a"]}, "{}"),
    "pattern": ({"type": "string", "pattern": "^[0-9]+$"}, '"ab"'),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 3}, "3"),
    "prefixItems": ({"type": "array", "prefixItems": [INT], "items": False}, "[1, 2]"),
}


def _accepts(schema: dict, document: str) -> bool:
    grammar = xgrammar.Grammar.from_json_schema(
        json.dumps(schema), any_whitespace=True, strict_mode=True, max_whitespace_cnt=MAX_WHITESPACE
    )
    return bool(_is_grammar_accept_string(grammar, document))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_keywords_are_ones_xgrammar_does_not_enforce(name):
    schema, breaking, keyword = REFUSED[name]
    # (an external $ref cannot even be resolved: jsonschema refuses to decide)
    with pytest.raises((jsonschema.ValidationError, referencing.exceptions.Unresolvable)):
        jsonschema.validate(json.loads(breaking), schema)
    assert _accepts(schema, breaking), f"xgrammar now enforces {name}: the rule may go"
    problem = unenforced(schema)
    assert problem is not None and f"'{keyword}'" in problem


@pytest.mark.parametrize("name", sorted(REFUSED_DUPLICATE_KEYS))
def test_keywords_that_let_keys_repeat_are_refused(name):
    schema, duplicated = REFUSED_DUPLICATE_KEYS[name]
    assert _accepts(schema, duplicated)
    assert f"'{name}'" in (unenforced(schema) or "")


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_allowed_keywords_are_enforced(name):
    schema, breaking = ALLOWED[name]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(breaking), schema)
    assert not _accepts(schema, breaking)
    assert unenforced(schema) is None


def test_the_refusal_says_where_the_keyword_is():
    schema = {"type": "object", "properties": {"a": {"type": "array", "contains": INT}}}
    assert unenforced(schema) == "'contains' (at #/properties/a)"
