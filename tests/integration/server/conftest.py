"""A real server process on 127.0.0.1 with the real embedded model and a volume of test adapters."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from lorayard.testing.random_adapter import build_random_adapter, peft_reference
from lorayard.testing.server import ServerProcess, publish_folder, start_server
from lorayard.train.__main__ import main as train_main
from lorayard.volume import AdapterVolume

__all__ = ["ServerProcess", "publish_folder", "start_server"]

# Different ranks and target modules: one batch must mix them.
REAL_ADAPTERS = {
    "qv8": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "all16": {"r": 16, "lora_alpha": 16, "target_modules": "all-linear"},
}


BASE = "smollm2-135m-instruct"
"""The embedded base's model name on the API."""
QUESTIONS = ["What is the capital of France?", "Name a fruit.", "Give me a word that rhymes with cat."]


def ask(client: openai.OpenAI, question: str, **kwargs: Any) -> Any:
    """One greedy chat turn (``model`` defaults to the base, ``max_tokens`` to 16)."""
    return client.chat.completions.create(
        model=kwargs.pop("model", BASE),
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=kwargs.pop("max_tokens", 16),
        **kwargs,
    )


def assert_mixed_batch_equals_peft(
    client: openai.OpenAI, base_path: Path, tokenizer: Any, adapter_sources: Path
) -> None:
    """Two adapters of different ranks and targets and the base, asked at once (one batch), each
    answer equal to plain PEFT's greedy ``generate``; and the adapters do change the answers."""
    cases = [(adapter, question) for adapter in ("qv8", "all16", None) for question in QUESTIONS[:2]]

    def answer(case: tuple[str | None, str]) -> str:
        adapter, question = case
        extra = {"extra_body": {"adapter": adapter}} if adapter else {}
        return ask(client, question, **extra).choices[0].message.content

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(answer, cases))
    for (adapter, question), got in zip(cases, answers, strict=True):
        source = adapter_sources / adapter if adapter else None
        assert got == peft_reference(base_path, source, tokenizer, question, 16), (adapter, question)
    assert answers[0] != answers[4] or answers[1] != answers[5], "the adapter must change answers"


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}},
    "required": ["city"],
    "additionalProperties": False,
}
"""One tool's parameters, small enough for a tiny model's calls to finish within a few tokens."""
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER,
        },
    }
]


SHORT_TRAINING = ["--batch-size", "4", "--eval-steps", "2", "--lr", "1e-3", "--max-steps", "3"]
"""A few steps of the real job: enough to publish a trained adapter on a tiny base."""


def train_and_publish(base: Path, adapters: Path, data: Path, name: str, *flags: str) -> None:
    """``name`` trained on ``data`` by the real job (SHORT_TRAINING, then ``flags``) and published."""
    args = ["--base-model", str(base), "--adapters-dir", str(adapters), "--data", str(data), "--name", name]
    assert train_main([*args, *SHORT_TRAINING, *flags]) == 0


@contextmanager
def openai_on(base: Path, adapters: Path, log: Path) -> Iterator[openai.OpenAI]:
    """A real server for ``base`` and the volume ``adapters``, and an openai client of it."""
    server = start_server(["--base-model", str(base), "--adapters-dir", str(adapters)], log)
    try:
        yield openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    finally:
        server.stop()


def make_real_adapter(base_path: Path, out: Path, seed: int, **lora) -> None:
    # 0.3: changes answers without turning them into noise
    build_random_adapter(base_path, out, seed, b_scale=0.3, **lora)


@pytest.fixture(scope="session")
def real_adapter_sources(tmp_path_factory, real_base) -> dict[str, Path]:
    """Random PEFT adapters on the real base, in PEFT's format, outside any volume."""
    root = tmp_path_factory.mktemp("real-adapter-sources")
    for seed, (name, spec) in enumerate(REAL_ADAPTERS.items()):
        make_real_adapter(real_base.path, root / name, seed, **spec)
    make_real_adapter(real_base.path, root / "qv8-v2", 99, **REAL_ADAPTERS["qv8"])
    return root


@pytest.fixture(scope="session")
def real_volume(tmp_path_factory, real_base, real_adapter_sources) -> Path:
    """qv8 published (v1) with a manifest; all16 as a plain PEFT folder."""
    root = tmp_path_factory.mktemp("real-volume")
    volume = AdapterVolume(root)
    publish_folder(volume, "qv8", real_adapter_sources / "qv8", real_base.fingerprint, real_base.model_id)
    plain = root / "all16"
    plain.mkdir()
    for file in (real_adapter_sources / "all16").iterdir():
        (plain / file.name).write_bytes(file.read_bytes())
    return root


@pytest.fixture(scope="session")
def real_server(real_volume, tmp_path_factory):
    server = start_server(
        ["--adapters-dir", str(real_volume), "--poll-interval", "0.3", "--max-tokens-limit", "256"],
        tmp_path_factory.mktemp("logs") / "real-server.log",
    )
    yield server
    server.stop()
