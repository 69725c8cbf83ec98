import asyncio
import json

import httpx
import pytest
from lorayard.client import AsyncLorayardClient, LorayardClient


class Recorder:
    """Records requests and answers by path with a fresh response (status, JSON or text) each time."""

    def __init__(self, answers):
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, content = self.answers[request.url.path]
        if isinstance(content, str):
            return httpx.Response(status, text=content)
        return httpx.Response(status, json=content)

    @property
    def last_body(self):
        return json.loads(self.requests[-1].content)


@pytest.fixture
def recorder(wire):
    models = {
        "object": "list",
        "data": [
            {
                "id": "smollm2",
                "object": "model",
                "owned_by": "lorayard",
                "root": "smollm2",
                "max_model_len": 2048,
            },
            {
                "id": "support",
                "object": "model",
                "root": "smollm2",
                "parent": "smollm2",
                "versions": ["v1", "v2"],
            },
        ],
    }
    completion = {
        "id": "cmpl-1",
        "model": "support",
        "choices": [{"index": 0, "text": " world", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    return Recorder(
        {
            "/v1/chat/completions": (200, wire.chat_response("Hi!", model="support")),
            "/v1/completions": (200, completion),
            "/v1/models": (200, models),
            "/v1/load_lora_adapter": (200, {"message": "loaded", "name": "support"}),
            "/v1/unload_lora_adapter": (200, "Success: LoRA adapter 'support' removed."),
            "/health": (200, {"status": "ok"}),
            "/ready": (503, {"error": {"message": "draining"}}),
            "/metrics": (200, "# HELP x\n"),
        }
    )


def test_chat_sends_adapter_key_and_sampling(recorder):
    client = LorayardClient("http://srv:1/v1/", api_key="k3y", transport=httpx.MockTransport(recorder))
    result = client.chat(
        [{"role": "user", "content": "Hello"}], adapter="support@v2", max_tokens=8, seed=None
    )
    request = recorder.requests[-1]
    assert str(request.url) == "http://srv:1/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k3y"
    assert recorder.last_body == {
        "model": "support@v2",
        "adapter": "support@v2",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
    }
    assert result.text == "Hi!" and result.finish_reason == "stop"
    assert result.adapter == "support@v2" and result.model == "support"
    assert result.usage.completion_tokens == 3


def test_model_without_adapter_and_default_model(recorder):
    client = LorayardClient("http://srv/v1", transport=httpx.MockTransport(recorder))
    client.chat([{"role": "user", "content": "x"}])
    assert "model" not in recorder.last_body and "adapter" not in recorder.last_body
    assert "authorization" not in recorder.requests[-1].headers
    client.chat([{"role": "user", "content": "x"}], model="support")
    assert recorder.last_body["model"] == "support" and "adapter" not in recorder.last_body
    client = LorayardClient("http://srv/v1", model="smollm2", transport=httpx.MockTransport(recorder))
    client.complete("Hello", max_tokens=2)
    assert recorder.last_body == {"model": "smollm2", "prompt": "Hello", "max_tokens": 2}


def test_api_key_from_environment(recorder, monkeypatch):
    monkeypatch.setenv("LORAYARD_API_KEY", "from-env")
    LorayardClient("http://srv/v1", transport=httpx.MockTransport(recorder)).models()
    assert recorder.requests[-1].headers["authorization"] == "Bearer from-env"


def test_complete_models_adapters_and_probes(recorder):
    client = LorayardClient("http://srv/v1", transport=httpx.MockTransport(recorder))
    result = client.complete("Hello", adapter="support")
    assert result.text == " world" and result.finish_reason == "length"

    models = client.models()
    assert [m.id for m in models] == ["smollm2", "support"]
    assert [m.is_adapter for m in models] == [False, True]
    assert models[1].extra_fields == {"versions": ["v1", "v2"]}

    loaded = client.load_adapter("support", "support/v2")
    assert recorder.last_body == {"lora_name": "support", "lora_path": "support/v2"}
    assert loaded.message == "loaded" and loaded.fields["name"] == "support"
    unloaded = client.unload_adapter("support")
    assert recorder.last_body == {"lora_name": "support"}
    assert unloaded.message.startswith("Success")

    assert client.health() is True
    assert client.ready() is False
    assert client.metrics_text().startswith("# HELP")
    assert [r.url.path for r in recorder.requests[-3:]] == ["/health", "/ready", "/metrics"]


def test_async_twin_has_the_same_results(recorder):
    async def run():
        async def handler(request):
            return recorder(request)

        async with AsyncLorayardClient("http://srv/v1", transport=httpx.MockTransport(handler)) as client:
            chat = await client.chat([{"role": "user", "content": "Hello"}], adapter="support", max_tokens=8)
            models = await client.models()
            return chat, models, await client.health(), await client.ready()

    chat, models, healthy, ready = asyncio.run(run())
    sync = LorayardClient("http://srv/v1", transport=httpx.MockTransport(recorder))
    assert chat == sync.chat([{"role": "user", "content": "Hello"}], adapter="support", max_tokens=8)
    assert models == sync.models()
    assert (healthy, ready) == (True, False)


def test_twins_expose_the_same_methods():
    public = {name for name in dir(LorayardClient) if not name.startswith("_")}
    async_public = {name for name in dir(AsyncLorayardClient) if not name.startswith("_")}
    assert public - {"close"} == async_public - {"aclose"}
