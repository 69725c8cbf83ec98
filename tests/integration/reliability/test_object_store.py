"""A live server over adapters on an S3 API (moto's server mode on 127.0.0.1), and the lifecycle CLI.

Publish to the bucket through the volume contract, serve with ``--adapters-dir s3://...``, promote,
canary and roll back with ``python -m lorayard.train``; the object-store faults: a publish interrupted
between objects, a corrupt object, a second publisher of the same name.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import boto3
import httpx
import pytest

from lorayard.s3_storage import CLAIM_FILE
from lorayard.testing.server import publish_folder, start_server
from lorayard.volume import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LATEST_FILE, AdapterVolume

from .conftest import make_tiny_adapter
from .test_adapter_faults import wait_until

VERSION_HEADER = "x-lorayard-adapter-version"


@pytest.fixture(scope="module")
def bucket_location(s3_endpoint) -> str:
    name = f"serve-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/adapters"


@pytest.fixture(scope="module")
def s3_volume(bucket_location, tmp_path_factory) -> AdapterVolume:
    return AdapterVolume(bucket_location, cache_dir=tmp_path_factory.mktemp("publisher-cache"))


@pytest.fixture(scope="module")
def sources(tiny_base_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3-sources")
    return [make_tiny_adapter(tiny_base_dir, folder / f"seed{seed}", seed=seed) for seed in (11, 12)]


@pytest.fixture(scope="module")
def published(s3_volume, sources, fault_fingerprint) -> AdapterVolume:
    """alpha v1, v2 (different weights) and good v1 on the bucket before the server starts."""
    for name, source in (("alpha", sources[0]), ("alpha", sources[1]), ("good", sources[0])):
        publish_folder(s3_volume, name, source, fault_fingerprint, "tiny")
    return s3_volume


@pytest.fixture(scope="module")
def s3_server(published, bucket_location, tiny_base_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("s3-server")
    server = start_server(
        [
            *("--adapters-dir", bucket_location, "--base-model", str(tiny_base_dir)),
            *("--adapter-cache-dir", str(logs / "cache"), "--poll-interval", "0.2"),
            *("--max-model-len", "128", "--max-tokens-limit", "8", "--max-loaded-adapters", "6"),
        ],
        logs / "server.log",
    )
    yield server
    server.stop()
    assert "testing" not in server.log()  # the (dummy) secret never reaches the log


HTTP = httpx.Client(timeout=60)  # keep-alive: hundreds of tiny requests


def chat(server, adapter: str | None, user: str | None = None) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
    if adapter is not None:
        body["adapter"] = adapter
    if user is not None:
        body["user"] = user
    return HTTP.post(server.v1 + "/chat/completions", json=body)


def served(server, adapter: str, user: str | None = None) -> str:
    response = chat(server, adapter, user)
    assert response.status_code == 200, response.text
    version = response.headers[VERSION_HEADER]
    assert response.json()["model"] == f"{adapter.partition('@')[0]}@{version}"
    return version


def train_job(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "lorayard.train", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_serves_from_the_bucket_and_names_the_version(s3_server):
    assert served(s3_server, "alpha") == "v2"
    assert served(s3_server, "alpha@v1") == "v1"
    with httpx.stream(
        "POST",
        s3_server.v1 + "/chat/completions",
        json={
            "adapter": "alpha",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
            "stream": True,
        },
        timeout=60,
    ) as response:
        assert response.headers[VERSION_HEADER] == "v2"
    completion = HTTP.post(
        s3_server.v1 + "/completions", json={"adapter": "alpha@v1", "prompt": "a", "max_tokens": 1}
    )
    assert completion.headers[VERSION_HEADER] == "v1" and completion.json()["model"] == "alpha@v1"
    too_long = HTTP.post(
        s3_server.v1 + "/chat/completions",
        json={"adapter": "alpha", "messages": [{"role": "user", "content": "hi"}], "user": "u" * 300},
    )
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "user"
    models = {m["id"]: m for m in httpx.get(s3_server.v1 + "/models").json()["data"]}
    assert models["alpha"]["versions"] == ["v1", "v2"] and models["alpha"]["latest"] == "v2"


def test_promote_and_rollback_from_the_cli_are_followed_within_the_poll(s3_server, bucket_location):
    train_job("promote", "alpha", "v1", "--adapters-dir", bucket_location, "--reason", "v2 regressed")
    wait_until(lambda: served(s3_server, "alpha") == "v1")
    train_job("rollback", "alpha", "--adapters-dir", bucket_location)
    wait_until(lambda: served(s3_server, "alpha") == "v2")


def test_a_canary_split_routes_as_the_routing_file_says_and_users_stick(
    s3_server, published, bucket_location
):
    """Live: every request goes where ``Routing.pick`` sends its user (the share over many users is
    tested on the function itself); a user keeps their version; a pin still pins."""
    train_job("promote", "alpha", "v1", "--canary", "20", "--adapters-dir", bucket_location)
    routing = published.routing("alpha")
    assert [(r.version, r.weight) for r in routing.routes] == [("v2", 80), ("v1", 20)]
    users = [f"user-{i}" for i in range(80)]
    expected = {user: f"v{routing.pick('alpha', user)}" for user in users}
    on_canary = next(user for user in users if expected[user] == "v1")
    wait_until(lambda: served(s3_server, "alpha", on_canary) == "v1")  # the server's poll saw the split
    assert {user: served(s3_server, "alpha", user) for user in users} == expected
    assert 0.1 <= list(expected.values()).count("v1") / len(users) <= 0.3
    assert {served(s3_server, "alpha", on_canary) for _ in range(5)} == {"v1"}
    assert served(s3_server, "alpha@v2", on_canary) == "v2"
    metrics = httpx.get(s3_server.base_url + "/metrics").text
    for version in ("v1", "v2"):
        assert f'lorayard_requests_total{{adapter="alpha",status="200",version="{version}"}}' in metrics
    train_job("promote", "alpha", "v2", "--adapters-dir", bucket_location)  # ends the split
    wait_until(lambda: served(s3_server, "alpha", on_canary) == "v2")


def test_a_publish_interrupted_between_objects_is_never_served(s3_server, published, bucket_location):
    bucket, _, prefix = bucket_location.removeprefix("s3://").partition("/")
    client = boto3.client("s3")
    # A publisher killed after uploading its weights: claim and files of v3, no manifest; LATEST too.
    for file, body in ((CLAIM_FILE, b"{}"), (ADAPTER_CONFIG_FILE, b"{}"), (ADAPTER_WEIGHTS_FILE, b"torn")):
        client.put_object(Bucket=bucket, Key=f"{prefix}/alpha/v3/{file}", Body=body)
    client.put_object(Bucket=bucket, Key=f"{prefix}/alpha/{LATEST_FILE}", Body=b"v3\n")
    for _ in range(10):  # across several polls
        assert served(s3_server, "alpha") == "v2"
    assert chat(s3_server, "alpha@v3").status_code == 404
    client.put_object(Bucket=bucket, Key=f"{prefix}/alpha/{LATEST_FILE}", Body=b"v2\n")


def test_a_corrupt_object_is_422_for_that_adapter_only(
    s3_server, published, sources, fault_fingerprint, bucket_location
):
    publish_folder(published, "broken", sources[0], fault_fingerprint, "tiny")
    bucket, _, prefix = bucket_location.removeprefix("s3://").partition("/")
    key = f"{prefix}/broken/v1/{ADAPTER_WEIGHTS_FILE}"
    client = boto3.client("s3")
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 1  # one flipped bit: still a readable safetensors file, not what was published
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    response = chat(s3_server, "broken")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_load_failed" and "sha256" in error["message"]
    assert served(s3_server, "good") == "v1" and chat(s3_server, None).status_code == 200
    publish_folder(published, "broken", sources[0], fault_fingerprint, "tiny")  # the fix: a new version
    wait_until(lambda: chat(s3_server, "broken").status_code == 200)


def test_two_publishers_of_one_name_get_distinct_versions(s3_server, published, sources, fault_fingerprint):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        versions = list(
            pool.map(lambda s: publish_folder(published, "twin", s, fault_fingerprint, "tiny"), sources)
        )
    assert sorted(versions) == [1, 2]
    wait_until(lambda: chat(s3_server, "twin").status_code == 200)
    assert {served(s3_server, "twin@v1"), served(s3_server, "twin@v2")} == {"v1", "v2"}
