"""Structured output: sampled outputs of constrained rows always parse and validate, in mixed-adapter
batches beside unconstrained rows that stay exactly as they are alone."""

import asyncio
import json
import uuid
from dataclasses import replace

import jsonschema
import pytest

from lorayard.server.engine.guided import GuidedCompiler
from lorayard.server.engine.types import GuidedDecoding, InvalidRequest, Request, SamplingParams

from .test_engine import _load

EOS = 2  # <|im_end|> of the embedded tokenizer, which the tiny base shares
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "ok": {"type": "boolean"},
                },
                "required": ["id", "ok"],
            },
            "minItems": 1,
            "maxItems": 3,
        },
        "note": {"type": ["string", "null"], "maxLength": 8},
    },
    "required": ["items", "note"],
}
ANY_OBJECT = {"type": "object"}
# A random model almost never closes an open string by itself (a trained one does); these biases
# on '"', '",', '"}' and '}' stand in for that habit, so free-form objects end within max_tokens.
CLOSING_BIAS = ((18, 10.0), (1002, 10.0), (23597, 10.0), (109, 10.0))
PROMPT_TEXT = "Once upon a time, in a quiet village by the sea, there lived an old fisherman who"
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def compiler(real_tokenizer) -> GuidedCompiler:
    return GuidedCompiler(real_tokenizer, len(real_tokenizer), {EOS})


def _guided(schema: dict) -> GuidedDecoding:
    if schema is ANY_OBJECT:
        return GuidedDecoding("json_object")
    return GuidedDecoding("json_schema", json.dumps(schema))


async def _run(engine, cases):
    async def one(prompt, params, adapter):
        events = [e async for e in engine.submit(Request(uuid.uuid4().hex, prompt, params, adapter))]
        return [e.token_id for e in events if e.token_id is not None], events[-1]

    engine.start()
    return await asyncio.gather(*(one(*case) for case in cases))


def test_sampled_structured_output_always_validates_in_a_mixed_batch(
    make_engine, compiler, real_tokenizer, tiny_base_dir, tiny_adapters
):
    """Temperature 1, several seeds, three grammars on three adapters (base included) in one batch
    with two unconstrained rows: every constrained output ends with end-of-turn ("stop"), parses and
    validates against its schema (jsonschema); without the grammar the same seeds give no JSON; the
    unconstrained rows (greedy and seeded sampling) are token for token what they are alone."""
    engine = make_engine(max_batch_size=16, max_model_len=256, eos_token_ids={EOS}, guided=compiler)
    handles = {name: _load(engine, tiny_base_dir, tiny_adapters, name) for name in ("qv4", "all8")}
    prompt = real_tokenizer.encode(PROMPT_TEXT)
    constrained = []
    for seed in range(3):
        constrained.append((PERSON, None, (), seed))
        constrained.append((ORDER, "all8", (), 100 + seed))
    constrained += [(ANY_OBJECT, "qv4", CLOSING_BIAS, seed) for seed in range(200, 202)]
    free = [
        (prompt, SamplingParams(max_tokens=40, temperature=0.0), None),
        (prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=7), handles["all8"]),
    ]

    def params(schema, bias, seed, guided=True):
        return SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=1.0,
            seed=seed,
            logit_bias=bias,
            guided=_guided(schema) if guided else None,
        )

    cases = [(prompt, params(s, bias, seed), handles.get(name)) for s, name, bias, seed in constrained]
    alone = [asyncio.run(_run(engine, [case]))[0] for case in free]
    mixed = asyncio.run(_run(engine, cases + free))
    unguided = asyncio.run(
        _run(engine, [(p, replace(sp, guided=None, max_tokens=60), a) for p, sp, a in cases]),
    )

    guided_results = mixed[: len(cases)]
    for (schema, name, _, seed), (tokens, last), (free_tokens, _) in zip(
        constrained, guided_results, unguided, strict=True
    ):
        assert last.finish_reason == "stop" and last.error is None, (name, seed)
        assert tokens[-1] == EOS and EOS not in tokens[:-1]
        document = json.loads(real_tokenizer.decode(tokens[:-1]))
        jsonschema.validate(document, schema)
        with pytest.raises(ValueError):  # json.JSONDecodeError: the prompt alone yields no JSON
            json.loads(real_tokenizer.decode(free_tokens))
    # The same outputs (the mixed run found the prompt in the prefix cache: only cached_tokens differs)
    uncached = [(tokens, replace(last, cached_tokens=None)) for tokens, last in mixed[len(cases) :]]
    assert uncached == [(tokens, replace(last, cached_tokens=None)) for tokens, last in alone]


def test_without_end_of_turn_tokens_the_grammar_ends_the_row(make_engine, real_tokenizer):
    """An engine with no end-of-turn ids (a base without a chat template): the row stops on the
    document's last token."""
    compiler = GuidedCompiler(real_tokenizer, len(real_tokenizer), ())
    engine = make_engine(max_batch_size=4, max_model_len=256, guided=compiler)
    prompt = real_tokenizer.encode(PROMPT_TEXT)
    cases = [
        (prompt, SamplingParams(max_tokens=MAX_TOKENS, seed=s, guided=_guided(PERSON)), None) for s in (1, 2)
    ]
    for tokens, last in asyncio.run(_run(engine, cases)):
        assert last.finish_reason == "stop"
        jsonschema.validate(json.loads(real_tokenizer.decode(tokens)), PERSON)


@pytest.mark.parametrize(
    ("guided", "reason"),
    [
        (GuidedDecoding("json_schema", "not json"), "Failed to parse JSON"),
        (GuidedDecoding("json_schema", '{"type": "objectx"}'), 'Unsupported type "objectx"'),
        (GuidedDecoding("json_schema", json.dumps({"type": "string", "pattern": "(("})), "parenthesis"),
        (GuidedDecoding("json_schema", None), "needs a schema"),
        # compiled by xgrammar but not enforced: refused by us, naming the keyword and where it is
        (
            GuidedDecoding(
                "json_schema",
                json.dumps(
                    {
                        **ORDER,
                        "properties": {**ORDER["properties"], "tags": {"type": "array", "uniqueItems": True}},
                    }
                ),
            ),
            "'uniqueItems' (at #/properties/tags)",
        ),
        (
            GuidedDecoding("json_schema", json.dumps({"anyOf": [{"not": {"type": "string"}}]})),
            "'not' (at #/anyOf/0)",
        ),
        (
            GuidedDecoding("json_schema", json.dumps({"allOf": [{"type": "integer"}, {"minimum": 5}]})),
            "'allOf'",
        ),
    ],
)
def test_a_schema_the_library_cannot_compile_is_an_invalid_request(make_engine, compiler, guided, reason):
    engine = make_engine(max_batch_size=1, max_model_len=64, guided=compiler)
    with pytest.raises(InvalidRequest) as refused:
        engine.submit(Request("bad", [1, 2], SamplingParams(max_tokens=4, guided=guided)))
    assert refused.value.param == "guided"
    assert reason in str(refused.value)
    assert not str(refused.value).split("output: ", 1)[-1].startswith("[")  # no C++ log prefix


def test_keywords_are_found_only_where_they_are_keywords(compiler):
    """A property named like an unenforced keyword is just a property."""
    schema = {"type": "object", "properties": {"not": {"type": "integer"}, "if": {"enum": ["a"]}}}
    compiler.compile(GuidedDecoding("json_schema", json.dumps(schema)))


def test_structured_output_needs_a_compiler_and_no_min_tokens(make_engine, compiler, real_tokenizer):
    guided = GuidedDecoding("json_object")
    plain = make_engine(max_batch_size=1, max_model_len=64)
    with pytest.raises(ValueError, match="width of the model's logits"):  # masks would miss the tail
        plain.guided = GuidedCompiler(real_tokenizer, plain.vocab_size + 64, {EOS})
    with pytest.raises(InvalidRequest, match="not available") as refused:
        plain.submit(Request("a", [1, 2], SamplingParams(max_tokens=4, guided=guided)))
    assert refused.value.param == "guided"
    engine = make_engine(max_batch_size=1, max_model_len=64, guided=compiler)
    with pytest.raises(InvalidRequest) as refused:
        engine.submit(Request("b", [1, 2], SamplingParams(max_tokens=4, min_tokens=2, guided=guided)))
    assert refused.value.param == "min_tokens"
