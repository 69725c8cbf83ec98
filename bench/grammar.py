"""grammar: per-token cost of structured-output token masks on the CPU, per grammar library.

For the embedded tokenizer (vocabulary 49152), each candidate library (xgrammar, llguidance,
outlines-core) compiles a JSON schema and a plain JSON object grammar, then walks the tokens of
valid documents: before each token it fills the 32-bit packed token mask (what the sampler
applies), checks that the mask allows that token, and accepts it; at the end the grammar must be
complete. Reported per library: mask-fill and accept time per token (median and p99, every
token of every document and repeat), compile time of each grammar (a fresh compiler each repeat,
so no cache), and the one-time tokenizer set-up. The engine uses the library with the lowest
mean mask + accept time per token (the cost paid on every constrained decode step) among those
that compile each grammar within 100 ms (a new schema's compile delays its request).

    python -m bench.grammar [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from bench.record import (
    SuiteResult,
    common_arguments,
    markdown_table,
    measuring,
    median,
    percentile,
    save_figure,
    suite_main,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address", "active", "role", "score"],
}
"""A typical tool-argument / extraction schema: strings, numbers, an enum, an array, a nested object."""

DOCUMENTS = [
    {
        "name": "Ada Lovelace",
        "age": 36,
        "email": "ada@example.org",
        "tags": ["math", "engines", "poetry"],
        "address": {"city": "London", "zip": "W1"},
        "active": False,
        "role": "admin",
        "score": 99.5,
    },
    {
        "name": "Grace Hopper, Rear Admiral",
        "age": 85,
        "tags": ["compilers", "COBOL", "nanoseconds", "debugging"],
        "address": {"city": "New York", "zip": "10001"},
        "active": True,
        "role": "user",
        "score": -3.25e2,
    },
    {
        "name": "Zoë \u00e9t\u00e9 \u6771\u4eac",
        "age": 0,
        "email": "zoe+test@example.com",
        "tags": [],
        "address": {"city": "S\u00e3o Paulo", "zip": "01000-000"},
        "active": True,
        "role": "guest",
        "score": 0.001,
    },
]
"""Valid instances of SCHEMA (and so JSON objects), in the schema's property order (outlines-core's
regex fixes the order); non-ASCII text on purpose: byte-level tokens split characters."""

GRAMMARS = {"json_schema": json.dumps(SCHEMA), "json_object": json.dumps({"type": "object"})}
COMPILE_LIMIT_MS = 100.0
"""A library must compile each grammar within this (median) to be chosen."""


@dataclass
class Candidate:
    """One library behind a common shape: compile(schema) -> new matcher per document."""

    name: str
    compile: Callable[[str], Callable[[], Matcher]]


class Matcher:
    """fill(mask [1, words]) fills row 0; accept(token) -> bool; complete() -> bool (EOS allowed)."""

    def __init__(
        self,
        fill: Callable[[torch.Tensor], None],
        accept: Callable[[int], bool],
        complete: Callable[[], bool],
    ) -> None:
        self.fill, self.accept, self.complete = fill, accept, complete


def _xgrammar(tokenizer: Any, vocab: int, threads: int) -> Candidate:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)

    def compile_(schema: str) -> Callable[[], Matcher]:
        compiled = xgr.GrammarCompiler(info, max_threads=threads).compile_json_schema(schema)

        def new() -> Matcher:
            m = xgr.GrammarMatcher(compiled)
            return Matcher(lambda mask: m.fill_next_token_bitmask(mask, 0), m.accept_token, m.is_completed)

        return new

    return Candidate("xgrammar", compile_)


def _llguidance(tokenizer: Any, vocab: int, threads: int) -> Candidate:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile_(schema: str) -> Callable[[], Matcher]:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        # The matcher builds its parser here; later matchers reuse the tokenizer's cached tables.
        llguidance.LLMatcher(lltok, grammar)

        def new() -> Matcher:
            m = llguidance.LLMatcher(lltok, grammar)
            return Matcher(
                lambda mask: llguidance.torch.fill_next_token_bitmask(m, mask, 0),
                m.consume_token,
                m.is_accepting,
            )

        return new

    return Candidate("llguidance", compile_)


def _outlines_core(tokenizer: Any, vocab: int, threads: int) -> Candidate:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, _token_bytes(tokenizer))

    def compile_(schema: str) -> Callable[[], Matcher]:
        index = outlines_core.Index(build_regex_from_schema(schema), vocabulary)

        def new() -> Matcher:
            guide = outlines_core.Guide(index)

            def accept(token: int) -> bool:
                guide.advance(token, return_tokens=False)
                return True

            return Matcher(
                lambda mask: guide.write_mask_into(mask.data_ptr(), mask.numel(), 4),
                accept,
                guide.is_finished,
            )

        return new

    return Candidate("outlines-core", compile_)


def _token_bytes(tokenizer: Any) -> dict[bytes, list[int]]:
    """Byte-level BPE token strings -> their bytes (outlines-core's constructor takes decoded tokens;
    its own from_pretrained needs the hub). Added/special tokens are not text and are left out."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decode = {c: b for b, c in bytes_to_unicode().items()}
    added = set(tokenizer.added_tokens_decoder)
    table: dict[bytes, list[int]] = {}
    for text, token in tokenizer.get_vocab().items():
        if token not in added:
            table.setdefault(bytes(decode[c] for c in text), []).append(token)
    return table


CANDIDATES = {"xgrammar": _xgrammar, "llguidance": _llguidance, "outlines-core": _outlines_core}
PACKAGES = {"xgrammar": "xgrammar", "llguidance": "llguidance", "outlines-core": "outlines-core"}
"""Distribution names, for the versions measured."""


def _walk(new: Callable[[], Matcher], tokens: list[int], vocab: int) -> tuple[list[float], list[float]]:
    """Mask-fill and accept microseconds per token of one document; raises if the grammar disagrees."""
    matcher = new()
    mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    fills, accepts = [], []
    for token in tokens:
        start = time.perf_counter()
        matcher.fill(mask)
        fills.append(round((time.perf_counter() - start) * 1e6, 2))
        if not (int(mask[0, token // 32]) >> (token % 32)) & 1:
            raise AssertionError(f"the mask refuses token {token} of a valid document")
        start = time.perf_counter()
        ok = matcher.accept(token)
        accepts.append(round((time.perf_counter() - start) * 1e6, 2))
        if ok is False:
            raise AssertionError(f"token {token} refused")
    if not matcher.complete():
        raise AssertionError("a valid document left the grammar incomplete")
    return fills, accepts


def _apply_us(vocab: int, backend: str, repeats: int = 200) -> float:
    """Median microseconds to apply a random mask to one row's logits (what the sampler does per
    constrained row, whichever library filled the mask: all three write this bitmask layout)."""
    import xgrammar

    mask = torch.randint(-(2**31), 2**31 - 1, (1, (vocab + 31) // 32), dtype=torch.int32)
    logits = torch.randn(1, vocab)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        xgrammar.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, backend=backend)
        times.append((time.perf_counter() - start) * 1e6)
    return median(times)


def _measure(args: argparse.Namespace, result: SuiteResult) -> None:
    from lorayard.base_model import load_tokenizer, resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model())
    vocab = len(tokenizer)
    documents = [
        tokenizer.encode(json.dumps(d, ensure_ascii=False), add_special_tokens=False) for d in DOCUMENTS
    ]
    result.config.update(vocab=vocab, document_tokens=[len(d) for d in documents])
    for backend in ("cpu", "torch_native"):
        result.rows.append({"kind": "apply", "backend": backend, "us": _apply_us(vocab, backend)})
    for name in args.libraries:
        make = CANDIDATES[name]
        start = time.perf_counter()
        candidate = make(tokenizer, vocab, args.threads)
        result.rows.append({"kind": "setup", "library": name, "seconds": time.perf_counter() - start})
        for repeat in range(args.repeats):
            for grammar, schema in GRAMMARS.items():
                start = time.perf_counter()
                new = candidate.compile(schema)
                compile_s = time.perf_counter() - start
                row = {"kind": "compile", "library": name, "grammar": grammar, "repeat": repeat}
                result.rows.append({**row, "seconds": compile_s})
                for doc, tokens in enumerate(documents):
                    fills, accepts = _walk(new, tokens, vocab)
                    result.rows.append(
                        {**row, "kind": "walk", "document": doc, "fill_us": fills, "accept_us": accepts}
                    )


def per_token(result: SuiteResult, library: str, grammar: str | None = None) -> dict[str, float]:
    """Microseconds per token: median / p99 of mask fill, accept and both over every walked token, and
    the mean step (fill + accept) per walk, median over walks."""
    walks = [
        r
        for r in result.rows
        if r["kind"] == "walk" and r["library"] == library and grammar in (None, r["grammar"])
    ]
    fills = [us for r in walks for us in r["fill_us"]]
    accepts = [us for r in walks for us in r["accept_us"]]
    both = [f + a for r in walks for f, a in zip(r["fill_us"], r["accept_us"], strict=True)]
    return {
        # A walk's total over its tokens, median over walks: spikes every walk has (a first mask
        # built lazily) count, a pause of the shared machine during one walk does not.
        "step_mean_us": median(
            [(sum(r["fill_us"]) + sum(r["accept_us"])) / len(r["fill_us"]) for r in walks]
        ),
        "fill_median_us": median(fills),
        "fill_p99_us": percentile(fills, 99),
        "accept_median_us": median(accepts),
        "step_median_us": median(both),
        "step_p99_us": percentile(both, 99),
    }


def compile_ms(result: SuiteResult, library: str, grammar: str) -> float:
    rows = [
        r
        for r in result.rows
        if r["kind"] == "compile" and r["library"] == library and r["grammar"] == grammar
    ]
    return median([r["seconds"] * 1e3 for r in rows])


def eligible(result: SuiteResult, library: str) -> bool:
    """Compiles every grammar within COMPILE_LIMIT_MS (a new schema's compile delays its request)."""
    return all(compile_ms(result, library, grammar) <= COMPILE_LIMIT_MS for grammar in GRAMMARS)


def chosen(result: SuiteResult) -> str:
    """Among the eligible libraries, the lowest mean per-token step (mask fill + accept) on the JSON
    schema: the mean, spikes included, is what a long constrained generation pays per token."""
    measured = result.config["libraries"]
    libraries = [lib for lib in measured if eligible(result, lib)] or measured
    return min(libraries, key=lambda lib: per_token(result, lib, "json_schema")["step_mean_us"])


def run(args: argparse.Namespace, tiny: Path | None = None) -> SuiteResult:
    """Measure and fill the headline figures (``tiny`` is unused: only the tokenizer is needed)."""
    config = {
        "repeats": args.repeats,
        "base": "no model: the embedded base's tokenizer",
        "schema": SCHEMA,
        "libraries": args.libraries,
        "versions": {name: version(PACKAGES[name]) for name in args.libraries},
    }
    with measuring("grammar", args, config) as result:
        _measure(args, result)
    best = chosen(result)
    for lib in result.config["libraries"]:
        stats = per_token(result, lib, "json_schema")
        result.add_headline(
            f"{lib}: mask fill + accept per token, JSON schema (mean)", stats["step_mean_us"], "us"
        )
    result.add_headline(
        f"chosen: {best}; its JSON-schema compile", compile_ms(result, best, "json_schema"), "ms"
    )
    return result


def details(result: SuiteResult) -> str:
    rows = []
    for lib in result.config["libraries"]:
        for grammar in GRAMMARS:
            s = per_token(result, lib, grammar)
            rows.append(
                [
                    f"{lib} {result.config['versions'][lib]}",
                    grammar,
                    s["fill_median_us"],
                    s["fill_p99_us"],
                    s["accept_median_us"],
                    s["step_mean_us"],
                    s["step_median_us"],
                    s["step_p99_us"],
                    compile_ms(result, lib, grammar),
                ]
            )
    setup = {r["library"]: r["seconds"] for r in result.rows if r["kind"] == "setup"}
    apply = {r["backend"]: r["us"] for r in result.rows if r["kind"] == "apply"}
    return (
        f"Vocabulary {result.config['vocab']}; documents of {result.config['document_tokens']} tokens, "
        f"{result.config['repeats']} repeats. Microseconds per token unless noted.\n\n"
        + markdown_table(
            [
                "library",
                "grammar",
                "fill p50",
                "fill p99",
                "accept p50",
                "step mean",
                "step p50",
                "step p99",
                "compile ms",
            ],
            rows,
        )
        + "\n\nTokenizer set-up (once per server): "
        + ", ".join(f"{lib} {s:.2f} s" for lib, s in setup.items())
        + ". Applying a mask to one row's logits (the sampler's part, the same bitmask layout for all "
        f"three): {apply['cpu']:.1f} us with xgrammar's CPU kernel, {apply['torch_native']:.1f} us "
        "with plain torch ops (what the engine uses on a GPU)"
        + f".\n\nChosen: **{chosen(result)}**: the lowest mean step on the JSON schema among the libraries "
        f"that compile each grammar within {COMPILE_LIMIT_MS:.0f} ms "
        f"({', '.join(lib for lib in result.config['libraries'] if eligible(result, lib))})."
    )


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    libs = result.config["libraries"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.38
    for offset, grammar in ((-width / 2, "json_schema"), (width / 2, "json_object")):
        values = [per_token(result, lib, grammar)["step_mean_us"] for lib in libs]
        ax.bar([i + offset for i in range(len(libs))], values, width, label=grammar)
    ax.set_xticks(range(len(libs)), libs)
    ax.set_yscale("log")
    ax.set_ylabel("mask fill + accept per token, us (mean)")
    ax.legend()
    save_figure(fig, folder / "per_token.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--libraries", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, _plot)
