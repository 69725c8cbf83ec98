"""Incremental Server-Sent Events decoding (the subset OpenAI-style streams use).

Network chunks split the stream anywhere: inside a line, between ``\\r`` and ``\\n``, or inside a
multi-byte UTF-8 character. The decoder therefore buffers *bytes* and only decodes complete lines,
so a character split across two chunks is decoded once, whole.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: its ``data`` lines joined by newlines, and its ``event`` name if any."""

    data: str
    event: str | None = None


class SSEDecoder:
    """Feed bytes as they arrive; get back the events completed by them."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data_lines: list[str] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume a network chunk and return every event it completes (possibly none)."""
        self._buffer.extend(chunk)
        events: list[ServerSentEvent] = []
        while True:
            line = self._next_line()
            if line is None:
                return events
            event = self._process_line(line)
            if event is not None:
                events.append(event)

    def flush(self) -> list[ServerSentEvent]:
        """At end of stream: dispatch a last event that lacked its terminating blank line."""
        events: list[ServerSentEvent] = []
        if self._buffer:
            line = self._buffer.decode("utf-8")
            self._buffer.clear()
            self._process_line(line)
        if self._data_lines:
            events.append(self._dispatch())
        return events

    def _next_line(self) -> str | None:
        # Lines end with \n, \r\n or \r. A trailing \r might be the first half of \r\n, so wait for more.
        newline = self._buffer.find(b"\n")
        carriage = self._buffer.find(b"\r")
        if carriage == -1 or (newline != -1 and newline < carriage):
            if newline == -1:
                return None
            cut, end = newline, newline + 1
        else:
            if carriage + 1 >= len(self._buffer):
                return None
            cut = carriage
            end = carriage + 2 if self._buffer[carriage + 1] == 0x0A else carriage + 1
        line = bytes(self._buffer[:cut]).decode("utf-8")
        del self._buffer[:end]
        return line

    def _process_line(self, line: str) -> ServerSentEvent | None:
        if line == "":
            return self._dispatch() if self._data_lines or self._event else None
        if line.startswith(":"):  # a comment, e.g. a keep-alive ping
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data_lines.append(value)
        elif field == "event":
            self._event = value
        return None

    def _dispatch(self) -> ServerSentEvent:
        event = ServerSentEvent(data="\n".join(self._data_lines), event=self._event)
        self._data_lines = []
        self._event = None
        return event
