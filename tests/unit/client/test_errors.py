import httpx
import pytest
from lorayard.client import (
    APIStatusError,
    BadRequestError,
    LorayardClient,
    LorayardError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    ServiceUnavailableError,
    UnauthorizedError,
    UnprocessableEntityError,
)
from lorayard.client.errors import error_class_for_status, parse_retry_after

NO_RETRY = RetryPolicy(max_attempts=1)


def _client_answering(response: httpx.Response) -> LorayardClient:
    return LorayardClient(
        "http://test/v1", transport=httpx.MockTransport(lambda request: response), retry=NO_RETRY
    )


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, BadRequestError),
        (401, UnauthorizedError),
        (404, NotFoundError),
        (413, PayloadTooLargeError),
        (422, UnprocessableEntityError),
        (429, RateLimitedError),
        (503, ServiceUnavailableError),
        (500, ServerError),
        (502, ServerError),
        (409, APIStatusError),
    ],
)
def test_status_maps_to_type_with_server_fields(wire, status, error_type):
    body = wire.error_body(
        "adapter 'x' not found", "not_found_error", param="adapter", code="adapter_not_found"
    )
    client = _client_answering(httpx.Response(status, json=body))
    with pytest.raises(error_type) as caught:
        client.chat([{"role": "user", "content": "x"}], adapter="x")
    error = caught.value
    assert type(error) is error_type
    assert isinstance(error, APIStatusError) and isinstance(error, LorayardError)
    assert error.status_code == status
    assert error.message == "adapter 'x' not found"
    assert error.type == "not_found_error"
    assert error.param == "adapter"
    assert error.code == "adapter_not_found"


def test_mapping_is_one_table():
    assert error_class_for_status(599) is ServerError
    assert error_class_for_status(418) is APIStatusError


def test_fastapi_detail_and_plain_text_bodies():
    client = _client_answering(httpx.Response(422, json={"detail": [{"loc": ["body", "messages"]}]}))
    with pytest.raises(UnprocessableEntityError) as caught:
        client.models()
    assert "messages" in caught.value.message

    client = _client_answering(httpx.Response(502, text="Bad gateway from proxy"))
    with pytest.raises(ServerError) as caught:
        client.models()
    assert caught.value.message == "Bad gateway from proxy"

    client = _client_answering(httpx.Response(500))
    with pytest.raises(ServerError) as caught:
        client.models()
    assert caught.value.message == "Internal Server Error"


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
