"""A corpus of real-world JSON schemas (schema_corpus/corpus.jsonl, in the style of JSONSchemaBench:
function-calling tools, GitHub and schemastore configs, Kubernetes, Snowplow, Washington Post,
pydantic and OpenAPI output) through the engine on the tiny random base: its outputs are arbitrary,
so every finished one must validate (``jsonschema``, formats checked) because the grammar made it;
the schemas the grammar cannot enforce are refused naming their keyword, never served.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest

from lorayard.server.engine.guided import GuidedCompiler
from lorayard.server.engine.types import GuidedDecoding, InvalidRequest, SamplingParams

from .test_guided import CLOSING_BIAS, EOS, PROMPT_TEXT, _run

CORPUS = [json.loads(line) for line in (Path(__file__).parent / "schema_corpus" / "corpus.jsonl").open()]
SERVED = [row for row in CORPUS if "refused" not in row]
REFUSED = [row for row in CORPUS if "refused" in row]
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def compiler(real_tokenizer) -> GuidedCompiler:
    return GuidedCompiler(real_tokenizer, len(real_tokenizer), {EOS})


def _guided(row: dict) -> GuidedDecoding:
    return GuidedDecoding("json_schema", json.dumps(row["schema"]))


def test_every_finished_output_validates(make_engine, compiler, real_tokenizer):
    engine = make_engine(max_batch_size=64, max_model_len=512, eos_token_ids={EOS}, guided=compiler)
    prompt = real_tokenizer.encode(PROMPT_TEXT)
    cases = [
        (
            prompt,
            SamplingParams(max_tokens=320, seed=seed, logit_bias=CLOSING_BIAS, guided=_guided(row)),
            None,
        )
        for row in SERVED
        for seed in SEEDS
    ]
    results = asyncio.run(_run(engine, cases))
    finished = 0
    checker = jsonschema.FormatChecker()
    for (row, _seed), (tokens, last) in zip(
        [(row, seed) for row in SERVED for seed in SEEDS], results, strict=True
    ):
        assert last.error is None, (row["name"], last.error)
        if last.finish_reason != "stop":  # cut at max_tokens: said so, never passed off as whole
            continue
        finished += 1
        document = json.loads(real_tokenizer.decode(tokens[:-1]))
        jsonschema.validate(document, row["schema"], format_checker=checker)
    # A random model rambles inside strings and numbers; most still finish within the bound.
    assert finished >= len(cases) * 2 // 3, f"{finished} of {len(cases)} finished"


@pytest.mark.parametrize("row", REFUSED, ids=[row["name"] for row in REFUSED])
def test_unenforceable_real_world_schemas_are_refused_by_keyword(compiler, row):
    with pytest.raises(InvalidRequest) as info:
        compiler.compile(_guided(row))
    assert f"'{row['refused']}'" in str(info.value)
