import asyncio
import json

import httpx
import pytest
from lorayard.client import AsyncLorayardClient, LorayardClient, ServiceUnavailableError, StreamParseError
from lorayard.client.sse import ServerSentEvent, SSEDecoder

MULTIBYTE = ["Hé", "llo ", "日本", " 🍣!", "\n"]


def _decode_in_pieces(data: bytes, size: int) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events = []
    for start in range(0, len(data), size):
        events += decoder.feed(data[start : start + size])
    return events + decoder.flush()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 1000])
def test_events_survive_any_chunking(size, wire):
    body = wire.sse_body(wire.chat_chunks(MULTIBYTE))
    events = _decode_in_pieces(body, size)
    assert events == _decode_in_pieces(body, len(body))
    assert events[-1].data == "[DONE]"
    assert len(events) == len(MULTIBYTE) + 4  # role chunk, pieces, finish, usage, [DONE]


def test_line_endings_comments_and_multiline_data():
    data = b": keep-alive\r\nevent: message\r\ndata: a\r\ndata: b\r\n\r\ndata: c\rdata: d\r\r\ndata: tail"
    events = _decode_in_pieces(data, 1)
    assert events == [
        ServerSentEvent(data="a\nb", event="message"),
        ServerSentEvent(data="c\nd"),
        ServerSentEvent(data="tail"),
    ]


def _chunked_transport(body: bytes, cut_points: list[int]) -> httpx.MockTransport:
    pieces = [body[a:b] for a, b in zip([0, *cut_points], [*cut_points, len(body)], strict=True)]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter(pieces), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def _cuts_inside_multibyte(body: bytes) -> list[int]:
    """Network chunk boundaries placed inside every multi-byte UTF-8 character."""
    cuts = [i for i in range(1, len(body)) if (body[i] & 0xC0) == 0x80]  # continuation bytes
    assert cuts, "the body must contain multi-byte characters"
    return cuts


def test_stream_reassembles_characters_split_across_network_chunks(wire):
    body = wire.sse_body(wire.chat_chunks(MULTIBYTE))
    client = LorayardClient(
        "http://test/v1", transport=_chunked_transport(body, _cuts_inside_multibyte(body))
    )
    stream = client.chat_stream([{"role": "user", "content": "hi"}], max_tokens=5)
    deltas = list(stream)
    assert deltas == MULTIBYTE
    assert stream.text == "".join(MULTIBYTE)
    assert stream.finish_reason == "stop"
    assert stream.usage is not None and stream.usage.completion_tokens == len(MULTIBYTE)
    assert len(stream.delta_times) == len(MULTIBYTE)
    assert stream.started_at is not None and stream.started_at <= stream.delta_times[0]
    result = stream.result()
    assert result.text == "".join(MULTIBYTE) and result.model == "m"


def test_async_stream_reassembles_split_characters(wire):
    body = wire.sse_body(wire.chat_chunks(MULTIBYTE))
    cuts = _cuts_inside_multibyte(body)
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]

    async def chunks():
        for piece in pieces:
            yield piece

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    async def run():
        async with AsyncLorayardClient("http://test/v1", transport=httpx.MockTransport(handler)) as client:
            stream = client.chat_stream([{"role": "user", "content": "hi"}])
            deltas = [delta async for delta in stream]
            return deltas, stream

    deltas, stream = asyncio.run(run())
    assert deltas == MULTIBYTE
    assert stream.usage.total_tokens == 7 + len(MULTIBYTE)


def test_completion_stream_reads_text_field(wire):
    chunks = [
        {"id": "c", "model": "m", "choices": [{"index": 0, "text": "ab"}]},
        {"id": "c", "model": "m", "choices": [{"index": 0, "text": "c", "finish_reason": "length"}]},
    ]
    transport = _chunked_transport(wire.sse_body(chunks), [3])
    stream = LorayardClient("http://test/v1", transport=transport).complete_stream("x", max_tokens=2)
    assert "".join(stream) == "abc"
    assert stream.finish_reason == "length"
    assert stream.usage is None  # this stand-in sent no usage chunk


def test_error_event_mid_stream_is_typed(wire):
    chunks = [
        *wire.chat_chunks(["a"])[:2],
        wire.error_body("engine stopped", "service_unavailable", code="503"),
    ]
    transport = _chunked_transport(wire.sse_body(chunks, done=False), [5])
    stream = LorayardClient("http://test/v1", transport=transport).chat_stream(
        [{"role": "user", "content": "x"}]
    )
    with pytest.raises(ServiceUnavailableError) as caught:
        list(stream)
    assert caught.value.message == "engine stopped"
    assert stream.text == "a"


def test_garbage_event_raises_stream_parse_error():
    transport = _chunked_transport(b"data: {not json\n\n", [4])
    stream = LorayardClient("http://test/v1", transport=transport).chat_stream(
        [{"role": "user", "content": "x"}]
    )
    with pytest.raises(StreamParseError):
        list(stream)


def test_stream_request_asks_for_usage():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(200, content=b"data: [DONE]\n\n")

    client = LorayardClient("http://test/v1", transport=httpx.MockTransport(handler))
    assert list(client.chat_stream([{"role": "user", "content": "x"}], adapter="a")) == []
    assert seen["stream"] is True and seen["stream_options"] == {"include_usage": True}
