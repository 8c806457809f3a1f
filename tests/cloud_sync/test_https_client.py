"""The HTTPS client against a real HTTP server on loopback: the batch and compensation
requests, and which errors are retried (never a 4xx)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from cloud_sync.https_client import (
    CloudHttpClient,
    CloudRejected,
    CloudServerError,
    CloudUnreachable,
)
from cloud_sync.outbox import OutboxItem
from devtools.broker import free_port
from tests.cloud_sync.cloud_server import CloudServer


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def item(n: int, topic: str = "results") -> OutboxItem:
    event_id = str(uuid.uuid4())
    payload = json.dumps({"event_id": event_id, "type": "alert", "n": n}).encode()
    return OutboxItem(n, event_id, "s", topic, payload, 0)


@pytest.fixture
def server() -> Iterator[CloudServer]:
    with CloudServer() as s:
        yield s


def client(base_url: str, **kw: object) -> CloudHttpClient:
    return CloudHttpClient(base_url, "gw-1", token="tok", timeout_s=2.0, sleep=no_sleep, **kw)  # type: ignore[arg-type]


def test_events_are_posted_as_one_ordered_batch_with_bearer_auth(server: CloudServer) -> None:
    async def scenario() -> None:
        async with client(server.base_url) as c:
            await c.post_events([item(1), item(2), item(3)])
            await c.post_compensation(item(4, "compensation"))

    asyncio.run(scenario())
    batch, comp = server.requests
    assert batch.path == "/api/gateways/gw-1/events"
    assert batch.headers["Authorization"] == "Bearer tok"
    assert [e["n"] for e in batch.body["events"]] == [1, 2, 3]
    assert comp.path == "/api/payments/compensation/alert"
    assert comp.body["n"] == 4


def test_a_4xx_is_never_retried_and_carries_its_reason(server: CloudServer) -> None:
    server.mode = 422
    server.error_body = {"error": "invalid_event", "detail": "missing machine_id"}

    async def scenario() -> None:
        async with client(server.base_url, retry_attempts=5) as c:
            with pytest.raises(CloudRejected) as info:
                await c.post_events([item(1)])
        assert info.value.status == 422
        assert info.value.reason == "invalid_event: missing machine_id"

    asyncio.run(scenario())
    assert server.count() == 1


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, CloudServerError),
        (503, CloudUnreachable),
        (429, CloudUnreachable),
        (408, CloudServerError),
    ],
)
def test_retryable_statuses_are_retried_a_few_times(
    server: CloudServer, status: int, error: type[Exception]
) -> None:
    server.mode = status

    async def scenario() -> None:
        async with client(server.base_url, retry_attempts=3) as c:
            with pytest.raises(error):
                await c.post_events([item(1)])

    asyncio.run(scenario())
    assert server.count() == 3


def test_a_hanging_server_is_a_timeout_then_recovers(server: CloudServer) -> None:
    server.mode = "hang"

    async def scenario() -> None:
        async with CloudHttpClient(
            server.base_url, "gw-1", token=None, timeout_s=0.2, retry_attempts=2, sleep=no_sleep
        ) as c:
            with pytest.raises(CloudServerError):
                await c.post_events([item(1)])
            server.mode = "ok"
            await c.post_events([item(2)])

    asyncio.run(scenario())
    assert server.count() == 3
    assert "Authorization" not in server.requests[0].headers


def test_connection_refused_is_unreachable() -> None:
    async def scenario() -> None:
        async with client(f"http://127.0.0.1:{free_port()}", retry_attempts=2) as c:
            with pytest.raises(CloudUnreachable):
                await c.post_events([item(1)])

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "raised",
    [
        httpx.DecodingError("bad gzip"),
        httpx.TooManyRedirects("loop"),
        httpx.InvalidURL("no host"),
        httpx.UnsupportedProtocol("ftp"),
    ],
)
def test_any_other_httpx_error_is_translated_to_a_retryable_server_error(
    raised: Exception,
) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise raised

    async def scenario() -> None:
        transport = httpx.MockTransport(handler)
        async with client("http://cloud.test", transport=transport, retry_attempts=2) as c:
            with pytest.raises(CloudServerError) as info:
                await c.post_events([item(1)])
            assert info.value.__cause__ is raised

    asyncio.run(scenario())
    assert calls == 2  # retryable: retried within the call


@pytest.mark.parametrize(
    ("status", "endpoint_fault"),
    [(401, True), (403, True), (404, True), (405, True), (413, True), (400, False), (422, False)],
)
def test_a_4xx_says_whether_the_endpoint_or_the_events_are_at_fault(
    server: CloudServer, status: int, endpoint_fault: bool
) -> None:
    server.mode = status

    async def scenario() -> None:
        async with client(server.base_url, retry_attempts=3) as c:
            with pytest.raises(CloudRejected) as info:
                await c.post_events([item(1)])
        assert info.value.status == status
        assert info.value.endpoint_fault is endpoint_fault

    asyncio.run(scenario())
    assert server.count() == 1  # never retried within the call
