"""The stored responses: bounded, expiring, and each visible only to the API key that made it."""

from __future__ import annotations

from lorayard.server.api.response_store import ResponseStore
from lorayard.server.api.responses_protocol import ResponseObject


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _response(response_id: str) -> ResponseObject:
    return ResponseObject(id=response_id, created_at=0.0, status="completed", model="m")


def test_a_response_is_only_its_owners():
    store = ResponseStore(capacity=4, ttl=60)
    store.put("alice", _response("resp_1"), [{"role": "user", "content": "hi"}])
    stored = store.get("alice", "resp_1")
    assert stored is not None and stored.conversation == ({"role": "user", "content": "hi"},)
    assert store.get("bob", "resp_1") is None
    assert not store.delete("bob", "resp_1") and store.get("alice", "resp_1") is not None
    assert store.delete("alice", "resp_1") and store.get("alice", "resp_1") is None


def test_the_oldest_goes_first_when_full():
    store = ResponseStore(capacity=2, ttl=60)
    for i in range(3):
        store.put("k", _response(f"resp_{i}"), [])
    assert len(store) == 2
    assert store.get("k", "resp_0") is None
    assert store.get("k", "resp_1") is not None and store.get("k", "resp_2") is not None


def test_responses_expire():
    clock = Clock()
    store = ResponseStore(capacity=10, ttl=30, clock=clock)
    store.put("k", _response("resp_old"), [])
    clock.now = 20
    store.put("k", _response("resp_new"), [])
    clock.now = 31
    assert store.get("k", "resp_old") is None and store.get("k", "resp_new") is not None
    clock.now = 51
    assert len(store) == 0


def test_capacity_zero_stores_nothing():
    store = ResponseStore(capacity=0, ttl=30)
    store.put("k", _response("resp_1"), [])
    assert store.get("k", "resp_1") is None
