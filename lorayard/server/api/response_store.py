"""Stored responses (``store: true``) for ``previous_response_id``, GET and DELETE: bounded, expiring,
and scoped to the API key that made each one.

In memory on purpose: a conversation continued on another replica, or after a restart, is a 400
naming ``previous_response_id`` (the client resends the whole input), never a wrong answer. All
access is on the event loop, so no lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorayard.server.api.responses_protocol import ResponseObject


@dataclass(frozen=True)
class StoredResponse:
    owner: str
    """Digest of the API key that made it (see :func:`lorayard.server.api.auth.caller_digest`)."""
    response: ResponseObject
    conversation: tuple[dict[str, Any], ...]
    """The chat messages a follow-up continues from: the input (without ``instructions``, which
    OpenAI does not carry over) and the output, as chat messages."""
    expires_at: float
    input_items: tuple[dict[str, Any], ...] = ()
    """The request's own ``input`` as items with ids, in order (``GET .../input_items``)."""


class ResponseStore:
    """At most ``capacity`` responses, each for ``ttl`` seconds; the oldest goes first when full."""

    def __init__(self, capacity: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self.clock = clock
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def put(
        self,
        owner: str,
        response: ResponseObject,
        conversation: list[dict[str, Any]],
        input_items: list[dict[str, Any]] | None = None,
    ) -> None:
        self._expire()
        self._items[response.id] = StoredResponse(
            owner, response, tuple(conversation), self.clock() + self.ttl, tuple(input_items or ())
        )
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """The response if ``owner`` made it and it has not expired; another key's is not there."""
        self._expire()
        stored = self._items.get(response_id)
        return stored if stored is not None and stored.owner == owner else None

    def delete(self, owner: str, response_id: str) -> bool:
        if self.get(owner, response_id) is None:
            return False
        del self._items[response_id]
        return True

    def _expire(self) -> None:
        # Insertion order is expiry order (one ttl for all), so expired ones are at the front.
        now = self.clock()
        while self._items:
            first = next(iter(self._items.values()))
            if first.expires_at > now:
                return
            self._items.popitem(last=False)
