"""A hanging Redis (SIGSTOP) does not slow the API (issue 20, point 10): starts do not wait for the
wake-up (it goes out from a thread of its own, with short timeouts and the workers' back-off),
/healthz says Redis is in trouble at once, and wake-ups flow again when Redis answers again."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis

from flowdb.notify import CHANNEL, EVENTS_CHANNEL, RETRY_SECONDS

from apiserver import ApiServer, api_for
from conftest import Database
from servers import RedisServer

ONE_STEP = """\
process:
  name: one-step
  steps:
    - {id: only, type: agent_task, agent: noop, message: "hi"}
"""
STARTS = 5


@contextmanager
def listening(url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(url, socket_timeout=10)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL, EVENTS_CHANNEL)
    assert pubsub.get_message(timeout=5) is None  # the subscribe confirmation, skipped
    try:
        yield pubsub
    finally:
        pubsub.close()
        client.close()


def messages(pubsub: Any, seconds: float) -> set[str]:
    """The channels that got a message within `seconds`."""
    got: set[str] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and got != {CHANNEL, EVENTS_CHANNEL}:
        message = pubsub.get_message(timeout=max(deadline - time.monotonic(), 0.01))
        if message is not None:
            got.add(message["channel"].decode())
    return got


def timed_start(api: ApiServer, http: httpx.Client) -> float:
    began = time.monotonic()
    response = http.post(f"{api.url}/v1/processes/one-step/instances", json={})
    elapsed = time.monotonic() - began
    assert response.status_code == 201, response.text
    return elapsed


@pytest.mark.slow
def test_a_hanging_redis_does_not_slow_starts_or_healthz(db: Database, private_redis: RedisServer) -> None:
    with api_for(db, redis_url=private_redis.url) as api, \
            httpx.Client(headers=api.auth("admin"), timeout=30) as http, listening(private_redis.url) as pubsub:
        deployed = http.post(f"{api.url}/v1/definitions", content=ONE_STEP,
                             headers={"content-type": "application/yaml"})
        assert deployed.status_code == 201, deployed.text
        timed_start(api, http)
        assert messages(pubsub, 5) == {CHANNEL, EVENTS_CHANNEL}  # wake-ups flow

        private_redis.hang()
        try:
            took = [timed_start(api, http) for _ in range(STARTS)]
            began = time.monotonic()
            health = http.get(f"{api.url}/healthz")
            health_took = time.monotonic() - began
        finally:
            private_redis.resume()
        # Before the fix each start waited for two publishes of up to 1 s each, and /healthz for up to 2 s.
        assert max(took) < 0.5 and statistics.median(took) < 0.2, took
        assert health_took < 0.5, health_took
        assert health.status_code == 200  # Redis is optional: degraded, still serving
        assert health.json() == {"status": "degraded", "database": "ok", "redis": "no answer within 0.1 s"}

        # Answering again: after at most the back-off, a start's wake-ups reach the subscribers again.
        messages(pubsub, 1)  # whatever was sent while it hung (Redis reads it when it continues)
        deadline = time.monotonic() + RETRY_SECONDS + 10
        while True:
            timed_start(api, http)
            if messages(pubsub, 1) == {CHANNEL, EVENTS_CHANNEL}:
                break
            assert time.monotonic() < deadline, "wake-ups did not flow again after Redis came back"
        health = http.get(f"{api.url}/healthz")
        assert (health.status_code, health.json()["redis"]) == (200, "ok")
