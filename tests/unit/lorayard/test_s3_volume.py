"""The volume contract on a real S3 API (moto's server on 127.0.0.1): same layout, same guarantees."""

import threading
from pathlib import Path

import boto3
import pytest

from lorayard.s3_storage import CLAIM_FILE
from lorayard.storage import IntegrityError, StorageUnavailable
from lorayard.volume import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, AdapterVolume
from tests.unit.lorayard.test_lifecycle import publish


def _bucket_and_prefix(location: str) -> tuple[str, str]:
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    return bucket, prefix + "/"


def _keys(location: str) -> set[str]:
    bucket, prefix = _bucket_and_prefix(location)
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])}


@pytest.fixture
def s3_volume(s3_bucket, tmp_path) -> AdapterVolume:
    return AdapterVolume(s3_bucket, cache_dir=tmp_path / "cache")


def test_the_object_store_holds_the_same_layout_as_a_folder(s3_volume, s3_bucket, adapters_dir):
    local = AdapterVolume(adapters_dir)
    for volume in (local, s3_volume):
        publish(volume, "support", "w0")
        publish(volume, "support", "w1")
        volume.promote("support", 1)
        volume.canary("support", 2, 25)
    on_disk = {str(p.relative_to(adapters_dir)) for p in adapters_dir.rglob("*") if p.is_file()}
    on_disk = {k for k in on_disk if not Path(k).name.startswith(".")}  # the local lock file
    in_bucket = {k for k in _keys(s3_bucket) if not k.endswith(CLAIM_FILE)}
    assert in_bucket == on_disk
    assert [a.name for a in s3_volume.list()] == ["support"]
    listing = s3_volume.list()[0]
    assert (listing.versions, listing.latest) == ([1, 2], 1)
    assert [r.version for r in listing.routing.routes] == ["v1", "v2"]

    adapter = s3_volume.resolve("support@v2")
    assert (adapter.path / ADAPTER_WEIGHTS_FILE).read_text() == "w1"  # a verified local copy
    assert adapter.manifest().version == 2
    adapter.verify()
    assert s3_volume.rollback("support").to == "v1" and s3_volume.pointers("support").routing is None
    assert s3_volume.rollback("support").to == "v2"
    assert [e.action for e in s3_volume.history("support")] == [
        *("publish", "publish", "promote", "canary", "rollback", "rollback")
    ]


def test_concurrent_publishers_get_distinct_versions(s3_volume):
    barrier = threading.Barrier(6)
    versions: list[int] = []

    def publisher(i: int) -> None:
        barrier.wait()
        versions.append(publish(s3_volume, "race", f"payload-{i}"))

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    payloads = {(s3_volume.resolve(f"race@v{v}").path / ADAPTER_WEIGHTS_FILE).read_text() for v in versions}
    assert payloads == {f"payload-{i}" for i in range(6)}
    assert s3_volume.latest("race") == 6
    assert len(s3_volume.history("race")) == 6  # conditional writes lost no history line


def test_a_publish_interrupted_between_objects_is_never_served(s3_volume, s3_bucket):
    publish(s3_volume, "support", "w0")
    # What a publisher killed after uploading the weights leaves: its claim and files, no manifest.
    bucket, prefix = _bucket_and_prefix(s3_bucket)
    client = boto3.client("s3")
    for file, body in ((CLAIM_FILE, b"{}"), (ADAPTER_CONFIG_FILE, b"{}"), (ADAPTER_WEIGHTS_FILE, b"half")):
        client.put_object(Bucket=bucket, Key=f"{prefix}support/v2/{file}", Body=body)
    client.put_object(Bucket=bucket, Key=f"{prefix}support/LATEST", Body=b"v2\n")  # even if LATEST says so
    assert s3_volume.versions("support") == [1]
    assert s3_volume.resolve("support").version == 1
    with pytest.raises(Exception, match=r"support@v2 not found"):
        s3_volume.resolve("support@v2")
    assert publish(s3_volume, "support", "w2") == 3  # the claimed number is never reused


def test_a_corrupt_object_fails_verification_and_is_not_cached(s3_volume, s3_bucket, tmp_path):
    publish(s3_volume, "support", "weights-ok")
    bucket, prefix = _bucket_and_prefix(s3_bucket)
    key = f"{prefix}support/v1/{ADAPTER_WEIGHTS_FILE}"
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"weights-XX")
    with pytest.raises(IntegrityError, match="sha256"):
        s3_volume.resolve("support")
    assert not list((tmp_path / "cache").rglob(ADAPTER_WEIGHTS_FILE))
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"weights-ok")  # repaired
    assert (s3_volume.resolve("support").path / ADAPTER_WEIGHTS_FILE).read_text() == "weights-ok"


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(s3_bucket, tmp_path):
    volume = AdapterVolume(s3_bucket, cache_dir=tmp_path / "cache", cache_max_bytes=4500)
    for i in range(4):
        publish(volume, "big", "x" * 1000 + str(i))
    for version in (1, 2, 3, 4):
        volume.resolve(f"big@v{version}")
    cached = sorted(p.parent.name for p in (tmp_path / "cache").rglob(MANIFEST_FILE))
    assert cached == ["v3", "v4"]  # about 1.7 KB each with its manifest, under a 4.5 KB bound


def test_bad_credentials_are_a_clear_error_that_never_shows_the_secret(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-s3cr3t")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    volume = AdapterVolume("s3://no-such-bucket-here/adapters", cache_dir=tmp_path)
    with pytest.raises(StorageUnavailable, match="s3://no-such-bucket-here/adapters/: listing") as caught:
        volume.list()
    assert "s3cr3t" not in str(caught.value)
