"""Broken adapters on a live server: a clear error for that adapter only, and recovery once fixed.

Each fault gets its own adapter name on one tiny-base server. After every fault the base and a good
adapter must still answer, and publishing a good version of the broken name must be served.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from lorayard.volume import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterVolume, BaseModelRef, Manifest

from .conftest import copy_folder

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "temperature": 0}


def chat(server, adapter: str | None, **extra) -> httpx.Response:
    body = {**CHAT, **extra} if adapter is None else {**CHAT, "adapter": adapter, **extra}
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)


def publish(volume: AdapterVolume, name: str, source: Path, sha256: str, mutate=None) -> int:
    """Publish ``source`` as the next version of ``name``; ``mutate(folder)`` then damages it on disk.

    (Damage after publishing: the publish itself refuses a staged folder without its two files.)
    """
    with volume.staging(name) as staged:
        for file in source.iterdir():
            shutil.copy(file, staged / file.name)
        manifest = Manifest(name=name, version=0, base_model=BaseModelRef(id="tiny", sha256=sha256))
        published = volume.publish(staged, manifest)
    if mutate is not None:
        mutate(published.path)
    return published.version


def assert_others_serve(server, good: str) -> None:
    assert chat(server, None).status_code == 200
    assert chat(server, good).status_code == 200


def listed(server, name: str) -> dict:
    """The /v1/models entry of ``name``, once the registry's volume scan has seen it."""
    found: list[dict] = []

    def seen() -> bool:
        found[:] = [m for m in httpx.get(server.v1 + "/models").json()["data"] if m["id"] == name]
        return bool(found)

    wait_until(seen)
    return found[0]


def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def good_name(volume, tiny_adapter_source, fault_fingerprint, fault_server) -> str:
    publish(volume, "good", tiny_adapter_source, fault_fingerprint)
    wait_until(lambda: chat(fault_server, "good").status_code == 200)
    return "good"


def _garbage(staged: Path) -> None:
    (staged / ADAPTER_WEIGHTS_FILE).write_bytes(b"\x00\x01 not a safetensors file" * 50)


def _truncate(staged: Path) -> None:
    data = (staged / ADAPTER_WEIGHTS_FILE).read_bytes()
    (staged / ADAPTER_WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _shapes_for_another_base(staged: Path) -> None:
    tensors = load_file(staged / ADAPTER_WEIGHTS_FILE)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :32].contiguous()  # in_features 32: not this base's hidden size
    save_file(tensors, staged / ADAPTER_WEIGHTS_FILE)


def _config_without_rank(staged: Path) -> None:
    config = json.loads((staged / ADAPTER_CONFIG_FILE).read_text())
    config["r"] = "eight"
    (staged / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))


def _weights_become_a_folder(staged: Path) -> None:
    (staged / ADAPTER_WEIGHTS_FILE).unlink()
    (staged / ADAPTER_WEIGHTS_FILE).mkdir()


def _config_dangling_symlink(staged: Path) -> None:
    (staged / ADAPTER_CONFIG_FILE).unlink()
    (staged / ADAPTER_CONFIG_FILE).symlink_to("/nonexistent/adapter_config.json")


FAULTS = {
    "corrupt-safetensors": (_garbage, "not a readable safetensors"),
    "truncated-safetensors": (_truncate, "not a readable safetensors"),
    "shapes-do-not-fit": (_shapes_for_another_base, "do not fit"),
    "config-bad-rank": (_config_without_rank, "r must be a positive integer"),
    "weights-unreadable": (_weights_become_a_folder, "adapter_model.safetensors is missing"),
    "config-dangling-symlink": (
        _config_dangling_symlink,
        "adapter_config.json resolves outside the adapters volume",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_broken_adapter_is_422_for_it_only_and_recovers(
    fault, fault_server, volume, tiny_adapter_source, fault_fingerprint, good_name
):
    mutate, words = FAULTS[fault]
    publish(volume, fault, tiny_adapter_source, fault_fingerprint, mutate)
    wait_until(lambda: chat(fault_server, fault).status_code != 404)
    response = chat(fault_server, fault)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_load_failed" and error["param"] == "adapter"
    assert words in error["message"] and f"{fault}@v1" in error["message"]
    assert words in listed(fault_server, fault)["load_error"]
    assert_others_serve(fault_server, good_name)
    # The fix: publish a good version; LATEST moves on and the name is served.
    publish(volume, fault, tiny_adapter_source, fault_fingerprint)
    wait_until(lambda: chat(fault_server, fault).status_code == 200)
    assert listed(fault_server, fault)["load_error"] is None
    assert chat(fault_server, f"{fault}@v1").status_code == 422  # the broken version stays refused


def test_wrong_base_adapter_is_422_and_recovers(
    fault_server, volume, tiny_adapter_source, fault_fingerprint, good_name
):
    publish(volume, "wrongbase", tiny_adapter_source, "0" * 64)
    wait_until(lambda: chat(fault_server, "wrongbase").status_code != 404)
    response = chat(fault_server, "wrongbase")
    assert response.status_code == 422
    assert "not on the base this server runs" in response.json()["error"]["message"]
    assert_others_serve(fault_server, good_name)
    publish(volume, "wrongbase", tiny_adapter_source, fault_fingerprint)
    wait_until(lambda: chat(fault_server, "wrongbase").status_code == 200)


def _stream(server, adapter: str, out: list) -> threading.Thread:
    def run() -> None:
        body = {**CHAT, "adapter": adapter, "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as response:
            out.append(response.status_code)
            out.extend(line for line in response.iter_lines() if line)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_adapter_deleted_mid_stream(fault_server, volume, tiny_adapter_source, fault_fingerprint, good_name):
    """The running stream finishes on the weights it holds; then the name is 404; a new publish serves."""
    publish(volume, "deleted", tiny_adapter_source, fault_fingerprint)
    wait_until(lambda: chat(fault_server, "deleted").status_code == 200)
    out: list = []
    thread = _stream(fault_server, "deleted", out)
    wait_until(lambda: len(out) > 2)
    shutil.rmtree(volume.root / "deleted")
    thread.join(timeout=60)
    assert out[0] == 200 and out[-1] == "data: [DONE]"
    assert chat(fault_server, "deleted").status_code == 404
    assert_others_serve(fault_server, good_name)
    publish(volume, "deleted", tiny_adapter_source, fault_fingerprint)
    wait_until(lambda: chat(fault_server, "deleted").status_code == 200)


def _logprobs(server, adapter: str) -> list[float]:
    return _answer(server, adapter)[0]


def _answer(server, adapter: str) -> tuple[list[float], int, str]:
    """(the answer's token logprobs, its prompt tokens served from the prefix cache, the model that
    served it)."""
    response = chat(server, adapter, logprobs=True, max_tokens=4)
    assert response.status_code == 200, response.text
    body = response.json()
    logprobs = [t["logprob"] for t in body["choices"][0]["logprobs"]["content"]]
    return logprobs, body["usage"]["prompt_tokens_details"]["cached_tokens"], body["model"]


def test_plain_folder_replaced_in_place_serves_the_new_files(
    fault_server, volume, tiny_adapter_source, other_adapter_source, good_name
):
    """A plain PEFT folder swapped for another adapter (same name, same key) is reloaded, not stale:
    neither its weights nor the prompt prefix the old weights computed (vLLM #30931) are reused."""
    plain = copy_folder(tiny_adapter_source, volume.root / "swapped")
    wait_until(lambda: chat(fault_server, "swapped").status_code == 200)
    before, before_cached, _ = _answer(fault_server, "swapped")
    assert before_cached > 0  # the prompt's prefix is cached under the old weights
    out: list = []
    thread = _stream(fault_server, "swapped", out)  # pins the old weights while the swap happens
    wait_until(lambda: len(out) > 2)
    staged = copy_folder(other_adapter_source, volume.root / ".swap-tmp")
    shutil.rmtree(plain)
    staged.rename(plain)
    after, after_cached, _ = _answer(fault_server, "swapped")
    thread.join(timeout=60)
    assert out[-1] == "data: [DONE]"
    assert after_cached == 0
    assert _answer(fault_server, "swapped")[1] > 0  # the new weights' own prefix is reused
    shutil.rmtree(volume.root / ".swap-tmp", ignore_errors=True)
    reference = copy_folder(other_adapter_source, volume.root / "reference")
    wait_until(lambda: chat(fault_server, "reference").status_code == 200)
    assert after == _logprobs(fault_server, "reference") and after != before
    shutil.rmtree(reference)
    assert_others_serve(fault_server, good_name)


def _served_by(server, adapter: str) -> str | None:
    """The version a name is served by, asked with a prompt shorter than a KV block (so it caches
    nothing another request could reuse)."""
    body = {"model": adapter, "prompt": "hi", "max_tokens": 1}
    return httpx.post(server.v1 + "/completions", json=body, timeout=60).json().get("model")


def test_a_new_version_never_reuses_the_old_versions_prefix(
    fault_server, volume, tiny_adapter_source, other_adapter_source, fault_fingerprint, good_name
):
    """v2 of a name, published while v1's prompt prefix is cached, computes the prompt afresh and
    answers exactly as the same weights published under another name do."""
    publish(volume, "versioned", tiny_adapter_source, fault_fingerprint)
    wait_until(lambda: chat(fault_server, "versioned").status_code == 200)
    _, cached_v1, model_v1 = _answer(fault_server, "versioned")
    assert cached_v1 > 0 and model_v1 == "versioned@v1"
    publish(volume, "versioned", other_adapter_source, fault_fingerprint)
    wait_until(lambda: _served_by(fault_server, "versioned") == "versioned@v2")
    v2, cached_v2, model_v2 = _answer(fault_server, "versioned")
    assert model_v2 == "versioned@v2" and cached_v2 == 0
    assert _answer(fault_server, "versioned")[1] > 0
    publish(volume, "versioned-twin", other_adapter_source, fault_fingerprint)
    wait_until(lambda: chat(fault_server, "versioned-twin").status_code == 200)
    assert v2 == _logprobs(fault_server, "versioned-twin")
    assert_others_serve(fault_server, good_name)


@pytest.mark.parametrize("kind", ["file", "dangling-symlink"])
def test_adapter_folder_unreadable(
    kind, fault_server, volume, tiny_adapter_source, fault_fingerprint, good_name
):
    """The name's folder replaced by a file or a dangling symlink (root ignores chmod): 404 for it only."""
    name = f"gone-{kind}"
    publish(volume, name, tiny_adapter_source, fault_fingerprint)
    wait_until(lambda: chat(fault_server, name).status_code == 200)
    shutil.rmtree(volume.root / name)
    if kind == "file":
        (volume.root / name).write_text("not a folder")
    else:
        (volume.root / name).symlink_to(volume.root / "nowhere")
    response = chat(fault_server, name)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["param"] == "adapter"
    assert_others_serve(fault_server, good_name)
    (volume.root / name).unlink()
    publish(volume, name, tiny_adapter_source, fault_fingerprint)
    wait_until(lambda: chat(fault_server, name).status_code == 200)
