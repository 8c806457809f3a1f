"""The gateway's HTTPS client for the cloud API (docs/cloud-api.yaml).

Exceptions (httpx errors are translated at the boundary, ``raise ... from exc``)::

    CloudError(Exception)
    ├── CloudRetryable            worth trying again later
    │   ├── CloudUnreachable      the request never reached a cloud application that could
    │   │                         act on it: connect errors, 429, 502, 503, 504. Not a
    │   │                         delivery attempt (OutboxStore.release).
    │   └── CloudServerError      sent, outcome unknown or failed: read/write timeouts,
    │                             protocol errors, 408, other 5xx, any other httpx error
    │                             (decoding, too many redirects, invalid URL). Counts as an
    │                             attempt.
    └── CloudRejected             4xx other than 408/429: this request will never be
                                  accepted as is; never retried within the call.
                                  ``.status``, ``.reason``. ``.endpoint_fault`` for
                                  401/403/404/405/413: the endpoint or the gateway's
                                  configuration (token, URL, batch size) is at fault, not
                                  the events (the dispatcher releases them, no DLQ);
                                  other 4xx (400, 409, 422...) -> DLQ.

Within one call, tenacity retries only :class:`CloudRetryable` errors, a few times with
full-jitter exponential backoff; the outbox's backoff and the circuit breakers take over
between calls. Every event carries its ``event_id``: the cloud de-duplicates, so a
retried batch that had in fact been applied is harmless.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from cloud_sync.backoff import Backoff
from cloud_sync.outbox import OutboxItem

if TYPE_CHECKING:
    import httpx

__all__ = [
    "CloudError",
    "CloudHttpClient",
    "CloudRejected",
    "CloudRetryable",
    "CloudServerError",
    "CloudUnreachable",
    "ENDPOINT_FAULT_STATUSES",
    "TIMEOUT_S",
]

#: Statuses that say "not now" without the request having been processed.
UNAVAILABLE_STATUSES = frozenset({429, 502, 503, 504})
#: 4xx statuses that blame the endpoint or the configuration, not the request's events:
#: bad/expired token, wrong URL or method, a batch too large for the server.
ENDPOINT_FAULT_STATUSES = frozenset({401, 403, 404, 405, 413})
#: Seconds for one request (connect, write, read).
TIMEOUT_S = 10.0
#: Attempts of one call (the first included) before the error goes to the dispatcher.
DEFAULT_RETRY_ATTEMPTS = 3
#: A rejection reason is stored in the DLQ and shown to technicians: keep it short.
MAX_REASON_CHARS = 200


class CloudError(Exception):
    """Any failure to deliver to the cloud API."""


class CloudRetryable(CloudError):
    """Try again later."""


class CloudUnreachable(CloudRetryable):
    """The cloud could not be reached or said it is unavailable; nothing was processed."""


class CloudServerError(CloudRetryable):
    """The request may have reached the cloud and failed there (or timed out)."""


class CloudRejected(CloudError):
    """A 4xx (other than 408/429): the cloud will never accept this request as is."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason

    @property
    def endpoint_fault(self) -> bool:
        """The endpoint or the configuration is wrong (401/403/404/405/413), not the
        events: retry later rather than dead-letter them."""
        return self.status in ENDPOINT_FAULT_STATUSES


@contextmanager
def _translate_httpx_errors() -> Iterator[None]:
    import httpx

    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise CloudUnreachable(f"{type(exc).__name__}: {exc}") from exc
    except httpx.TimeoutException as exc:  # read/write: the request may have arrived
        raise CloudServerError(f"{type(exc).__name__}: {exc}") from exc
    except httpx.TransportError as exc:  # protocol errors, a reset mid-response
        raise CloudServerError(f"{type(exc).__name__}: {exc}") from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        # Everything else httpx raises (DecodingError, TooManyRedirects, InvalidURL...):
        # retryable, and never an untranslated httpx error past this boundary.
        raise CloudServerError(f"{type(exc).__name__}: {exc}") from exc


def _check(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    reason = _reason(response)
    if status in UNAVAILABLE_STATUSES:
        raise CloudUnreachable(f"HTTP {status}: {reason}")
    if status >= 500 or status == 408:
        raise CloudServerError(f"HTTP {status}: {reason}")
    raise CloudRejected(status, reason)


def _reason(response: httpx.Response) -> str:
    # docs/cloud-api.yaml: errors are {"error": "<code>", "detail": "..."}.
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        reason = str(body["error"])
        if isinstance(body.get("detail"), str):
            reason = f"{reason}: {body['detail']}"
    else:
        reason = response.reason_phrase or "error"
    return reason[:MAX_REASON_CHARS]


class CloudHttpClient:
    def __init__(
        self,
        base_url: str,
        gateway_id: str,
        *,
        token: str | None,
        timeout_s: float = TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | str = True,
        retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
        retry_base_s: float = 0.5,
        retry_max_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        headers = {"User-Agent": "metalav-gateway", "Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self.gateway_id = gateway_id
        # httpx (and its TLS context) is loaded at the first request: a store whose
        # events go over MQTT may never make one, and it costs ~10 MB of memory.
        self._client_args: dict[str, Any] = {
            "base_url": base_url.rstrip("/"),
            "headers": headers,
            "timeout": timeout_s,
            "transport": transport,
            "verify": verify,
        }
        self._http: httpx.AsyncClient | None = None
        self._retry_attempts = max(1, retry_attempts)
        self._retry_wait = Backoff(retry_base_s, retry_max_s).wait
        self._sleep = sleep

    async def __aenter__(self) -> CloudHttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(**self._client_args)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def post_events(self, items: Sequence[OutboxItem]) -> None:
        """``POST /api/gateways/{gateway_id}/events`` with ``{"events": [...]}``, in order."""
        body = {"events": [_payload_object(item) for item in items]}
        await self._post(f"/api/gateways/{self.gateway_id}/events", body)

    async def post_compensation(self, item: OutboxItem) -> None:
        """``POST /api/payments/compensation/alert`` with the compensation event."""
        await self._post("/api/payments/compensation/alert", _payload_object(item))

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        content = json.dumps(body, separators=(",", ":")).encode()
        kwargs: dict[str, Any] = {}
        if self._sleep is not None:
            kwargs["sleep"] = self._sleep
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._retry_attempts),
            wait=self._retry_wait,
            retry=retry_if_exception_type(CloudRetryable),
            reraise=True,
            **kwargs,
        )
        async for attempt in retrying:
            with attempt:
                with _translate_httpx_errors():
                    response = await self._client.post(
                        path, content=content, headers={"Content-Type": "application/json"}
                    )
                _check(response)


def _payload_object(item: OutboxItem) -> dict[str, Any]:
    # The payload is the journal's JSON text; send it as an object, not a string.
    value = json.loads(item.payload)
    if not isinstance(value, dict):
        raise ValueError(f"outbox item {item.id}: payload is not a JSON object")
    return value
