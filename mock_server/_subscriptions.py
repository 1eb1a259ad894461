"""Subscriptions (protocol sections 6-7): durable cursors over streams that wake workers.

``SubscriptionManager`` holds every subscription of one server and decides each
outcome of the reserved ``{root}/__ds/subscriptions/...`` API as a ``Reply`` (status
and JSON), or ``SubscriptionError``; ``_subscriptions_http.py`` is its HTTP front end.

A subscription links streams (by its glob ``pattern`` or explicitly) and keeps one
cursor per link: the position acked so far, tied to the incarnation of the stream
it was acked in (a stream deleted and re-created starts from its beginning). When a
linked stream's tail passes its cursor and no wake is open, a *wake* opens: a new
``generation`` and ``wake_id`` and a snapshot of the tails. A webhook subscription
POSTs it, signed, to its URL (``_webhooks.py``); a pull-wake one appends a wake event
to its ``wake_stream`` for workers to ``claim``. Every callback, ack and release must
carry the open wake's ``generation`` and ``wake_id`` and its token, or gets
``409 FENCED``. A lease (``lease_ttl_ms``) bounds the holder: when it runs out the
wake closes, and if work is still pending the next one opens (a new generation,
which fences the stale holder).

The store tells the manager about every change of a stream (``StreamStore.listeners``)
from inside its own operations; the manager only notes the path there and looks at
it on the next turn of the event loop, so it never re-enters the store mid-change.

With a ``state_file`` (the SQLite data directory's ``subscriptions.json``) configs,
links, cursors and generations survive a restart; open wakes, leases and retry
schedules do not: ``resume()`` wakes pending work again, with a new generation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote

import httpx

from durable_client import wire as P

from ._model import StreamState
from ._offsets import ZERO_OFFSET
from ._store import AppendRequest, ProtocolError, StreamStore, check_not_reserved
from ._webhooks import (
    DELIVERY_TIMEOUT,
    SigningKey,
    WebhookUrlRejected,
    b64url,
    check_webhook_url,
    post_webhook,
    retry_delay,
)

log = logging.getLogger("mock_server.subscriptions")

DEFAULT_LEASE_MS: Final = 30_000
MIN_LEASE_MS: Final = 1_000
MAX_LEASE_MS: Final = 10 * 60_000
MAX_STREAMS_PER_REQUEST: Final = 1000

Kind = Literal["webhook", "pull-wake"]

_ID_RE: Final = re.compile(r"^[A-Za-z0-9._~:@!$&'()*+,;=-]{1,200}$")


class SubscriptionError(Exception):
    """A refusal: an HTTP status and the ``{"error": {"code", "message", ...}}`` body."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def invalid(message: str) -> SubscriptionError:
    return SubscriptionError(400, "INVALID_REQUEST", message)


def not_found() -> SubscriptionError:
    return SubscriptionError(404, "SUBSCRIPTION_NOT_FOUND", "subscription not found")


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any] | None = None


# ---------------------------------------------------------------------- paths and globs


def check_stream_path(value: object, what: str) -> str:
    """A stream-root-relative path (``events/abc``); 400 unless it could name a stream."""
    if not isinstance(value, str) or not value:
        raise invalid(f"{what} must be a non-empty string")
    if value.startswith("/") or value.endswith("/") or "//" in value:
        raise invalid(f"{what} {value!r}: paths are relative, with no empty segments")
    try:
        check_not_reserved(P.STREAM_PATH_PREFIX + value)
    except ProtocolError as exc:
        raise invalid(f"{what} {value!r}: {exc.message}") from None
    return value


def check_pattern(value: object) -> str:
    """A glob: ``*`` is one whole segment, ``**`` any number; 400 for ``*`` inside a segment."""
    pattern = check_stream_path(value, "pattern")
    for segment in pattern.split("/"):
        if "*" in segment and segment not in ("*", "**"):
            raise invalid(
                f"pattern segment {segment!r}: '*' and '**' must be whole segments"
                " ('*' one segment, '**' any number)"
            )
    return pattern


def glob_match(pattern: str, path: str) -> bool:
    """Whether ``path`` matches ``pattern`` (``*`` one segment, ``**`` zero or more)."""
    wanted, parts = pattern.split("/"), path.split("/")
    # reachable[j]: the pattern so far matches parts[:j]
    reachable = [True] + [False] * len(parts)
    for segment in wanted:
        if segment == "**":
            for j in range(1, len(parts) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
            continue
        following = [False] * (len(parts) + 1)
        for j in range(len(parts)):
            if reachable[j] and (segment == "*" or segment == parts[j]):
                following[j + 1] = True
        reachable = following
    return reachable[len(parts)]


# ---------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    """What a PUT asked for, normalized: the same config again re-confirms (200)."""

    kind: Kind
    pattern: str | None
    streams: tuple[str, ...]  # sorted, without duplicates
    webhook_url: str | None
    wake_stream: str | None
    lease_ms: int
    description: str | None

    @classmethod
    def parse(cls, body: object) -> SubscriptionConfig:
        """The config of a PUT body; ``SubscriptionError`` 400 for anything malformed."""
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object")
        known = {"type", "pattern", "streams", "webhook", "wake_stream", "lease_ttl_ms"}
        unknown = sorted(set(body) - known - {"description"})
        if unknown:
            raise invalid(f"unknown field(s): {', '.join(unknown)}")
        kind = body.get("type")
        if kind not in ("webhook", "pull-wake"):
            raise invalid('type must be "webhook" or "pull-wake"')
        pattern = check_pattern(body["pattern"]) if body.get("pattern") is not None else None
        raw_streams = body.get("streams")
        streams = [] if raw_streams is None else check_stream_list(raw_streams, allow_empty=True)
        if pattern is None and not streams:
            raise invalid("at least one of pattern or streams is required")
        lease = body.get("lease_ttl_ms", DEFAULT_LEASE_MS)
        if (
            isinstance(lease, bool)
            or not isinstance(lease, int)
            or not MIN_LEASE_MS <= lease <= MAX_LEASE_MS
        ):
            raise invalid(f"lease_ttl_ms must be an integer from {MIN_LEASE_MS} to {MAX_LEASE_MS}")
        description = body.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid("description must be a string")
        webhook_url: str | None = None
        wake_stream: str | None = None
        if kind == "webhook":
            webhook = body.get("webhook")
            if not isinstance(webhook, dict):
                raise invalid("a webhook subscription needs webhook.url")
            url = webhook.get("url")
            if not isinstance(url, str) or not url:
                raise invalid("a webhook subscription needs webhook.url")
            if set(webhook) - {"url"}:
                raise invalid("webhook takes only url (the server signs; there is no secret)")
            if body.get("wake_stream") is not None:
                raise invalid("wake_stream is for pull-wake subscriptions")
            try:
                check_webhook_url(url)
            except WebhookUrlRejected as exc:
                raise SubscriptionError(400, "WEBHOOK_URL_REJECTED", str(exc)) from None
            webhook_url = url
        else:
            if body.get("webhook") is not None:
                raise invalid("webhook is for webhook subscriptions")
            wake_stream = check_stream_path(body.get("wake_stream"), "wake_stream")
            if wake_stream in streams:
                raise invalid("the wake_stream cannot be one of the subscription's streams")
        return cls(
            kind, pattern, tuple(sorted(set(streams))), webhook_url, wake_stream, lease, description
        )


def check_stream_list(value: object, *, allow_empty: bool) -> list[str]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise invalid("streams must be a non-empty array of stream paths")
    if len(value) > MAX_STREAMS_PER_REQUEST:
        raise invalid(f"at most {MAX_STREAMS_PER_REQUEST} streams per request")
    return [check_stream_path(item, "stream") for item in value]


@dataclass(slots=True)
class Link:
    """One linked stream and its cursor: ``acked`` is a position of incarnation
    ``incarnation`` (None: the stream did not exist, so nothing is acked)."""

    path: str
    explicit: bool
    glob: bool
    incarnation: int | None
    acked: int


@dataclass(slots=True)
class Wake:
    wake_id: str
    generation: int
    snapshot: dict[str, tuple[int, int]]  # path -> (incarnation, tail position) at the wake
    token: str | None = None  # the callback (webhook) or claim (pull-wake) token
    holder: str | None = None  # the pull-wake worker that claimed it
    lease: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class Subscription:
    id: str
    config: SubscriptionConfig
    base_url: str  # the server as the creating request addressed it: callback and JWKS URLs
    created_at: str
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))  # tells re-creations apart
    links: dict[str, Link] = field(default_factory=dict)
    generation: int = 0
    wake: Wake | None = None
    status: Literal["active", "failed"] = "active"
    attempts: int = 0  # failed webhook deliveries in a row
    next_attempt_at: float | None = None
    delivery: asyncio.Task[None] | None = None


# ---------------------------------------------------------------------- the manager


class SubscriptionManager:
    """Every subscription of one server. Methods run on the event loop thread."""

    def __init__(
        self,
        store: StreamStore,
        key: SigningKey,
        *,
        stopping: asyncio.Event | None = None,
        client_factory: Callable[[], httpx.AsyncClient] | None = None,
        state_file: Path | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.stopping = stopping or asyncio.Event()
        self.state_file = state_file
        self._subscriptions: dict[str, Subscription] = {}
        self._token_secret = secrets.token_bytes(32)
        if state_file is not None:
            self._load(state_file)
        self._changed: set[str] = set()
        self._scheduled = False
        self._closed = False
        self._client: httpx.AsyncClient | None = None
        self._client_factory = client_factory or (
            lambda: httpx.AsyncClient(
                timeout=DELIVERY_TIMEOUT, follow_redirects=False, trust_env=False
            )
        )
        store.listeners.append(self._stream_changed)

    # ------------------------------------------------------------------ lifecycle

    def resume(self) -> None:
        """Wake what a restart left pending (call once, on the running loop)."""
        for sub in self._subscriptions.values():
            self._maybe_wake(sub)

    async def aclose(self) -> None:
        """Stop: no more wakes, deliveries cancelled, leases dropped, the client closed."""
        self._closed = True
        with contextlib.suppress(ValueError):
            self.store.listeners.remove(self._stream_changed)
        tasks = []
        for sub in self._subscriptions.values():
            self._end_wake(sub)
            if sub.delivery is not None:
                sub.delivery.cancel()
                tasks.append(sub.delivery)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def active(self) -> bool:
        return not self._closed and not self.stopping.is_set()

    # ------------------------------------------------------------------ CRUD

    def put(self, sub_id: str, body: object, base_url: str) -> Reply:
        check_id(sub_id)
        config = SubscriptionConfig.parse(body)
        existing = self._subscriptions.get(sub_id)
        if existing is not None:
            if existing.config != config:
                raise SubscriptionError(
                    409,
                    "SUBSCRIPTION_ALREADY_EXISTS",
                    "a subscription with this id exists with a different configuration",
                )
            return Reply(200, self.describe(existing))
        created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        sub = Subscription(sub_id, config, base_url, created)
        for path in config.streams:
            self._link(sub, path, explicit=True)
        if config.pattern is not None:
            for full in self.store.paths():
                found = _relative(full)
                if found is not None and self._glob_wants(sub, found):
                    self._link(sub, found, explicit=False)
        self._subscriptions[sub_id] = sub
        self._save()
        return Reply(201, self.describe(sub))

    def get(self, sub_id: str) -> Reply:
        return Reply(200, self.describe(self._require(sub_id)))

    def delete(self, sub_id: str) -> Reply:
        sub = self._subscriptions.pop(sub_id, None)
        if sub is None:
            raise not_found()
        self._end_wake(sub)
        if sub.delivery is not None:
            sub.delivery.cancel()
        self._save()
        return Reply(204)

    def add_streams(self, sub_id: str, body: object) -> Reply:
        sub = self._require(sub_id)
        if not isinstance(body, dict) or set(body) != {"streams"}:
            raise invalid('the body must be {"streams": [...]}')
        paths = check_stream_list(body["streams"], allow_empty=False)
        if sub.config.wake_stream in paths:
            raise invalid("the wake_stream cannot be one of the subscription's streams")
        for path in paths:
            self._link(sub, path, explicit=True)
        self._save()
        self._maybe_wake(sub)
        return Reply(204)

    def remove_stream(self, sub_id: str, path: str) -> Reply:
        sub = self._require(sub_id)
        check_stream_path(path, "stream")
        link = sub.links.get(path)
        if link is not None:
            link.explicit = False
            if not link.glob:
                del sub.links[path]
            self._save()
        return Reply(204)

    def describe(self, sub: Subscription) -> dict[str, Any]:
        config = sub.config
        webhook = None
        if config.webhook_url is not None:
            signing = {"alg": "ed25519", "kid": self.key.kid, "jwks_url": self.jwks_url(sub)}
            webhook = {"url": config.webhook_url, "signing": signing}
        description: dict[str, Any] = {
            "id": sub.id,
            "subscription_id": sub.id,
            "type": config.kind,
            "pattern": config.pattern,
            "streams": [
                {k: v for k, v in info.items() if k in ("path", "link_type", "acked_offset")}
                for info in self._stream_infos(sub)
            ],
            "webhook": webhook,
            "wake_stream": config.wake_stream,
            "lease_ttl_ms": config.lease_ms,
            "created_at": sub.created_at,
            "status": sub.status,
            "description": config.description,
            "generation": sub.generation,
        }
        if sub.next_attempt_at is not None:
            description["next_attempt_at"] = _iso(sub.next_attempt_at)
        return description

    def jwks_url(self, sub: Subscription) -> str:
        return f"{sub.base_url}{P.STREAM_PATH_PREFIX}{P.RESERVED_PREFIX}/jwks.json"

    def action_url(self, sub: Subscription, action: str) -> str:
        return (
            f"{sub.base_url}{P.STREAM_PATH_PREFIX}{P.RESERVED_PREFIX}/subscriptions/"
            f"{quote(sub.id, safe='')}/{action}"
        )

    # ------------------------------------------------------------------ wakes: callbacks

    def callback(self, sub_id: str, token: str | None, body: object) -> Reply:
        """A webhook receiver's ack (and ``done``) for the open wake."""
        sub = self._require(sub_id, kind="webhook")
        wake, request = self._fence(sub, token, body)
        self._apply_acks(sub, request)
        return self._finish_or_extend(sub, wake, request)

    def claim(self, sub_id: str, body: object) -> Reply:
        sub = self._require(sub_id, kind="pull-wake")
        if not isinstance(body, dict) or set(body) - {"worker"}:
            raise invalid('the body must be {"worker": "<name>"}')
        worker = body.get("worker")
        if not isinstance(worker, str) or not worker:
            raise invalid("worker must be a non-empty string")
        if sub.wake is not None and sub.wake.holder is not None:
            raise SubscriptionError(
                409,
                "ALREADY_CLAIMED",
                "another worker holds the lease",
                current_holder=sub.wake.holder,
                generation=sub.generation,
            )
        if sub.wake is None:
            if not self._pending(sub):
                raise SubscriptionError(409, "NO_PENDING_WORK", "no linked stream has pending work")
            self._open_wake(sub)
        wake = sub.wake
        assert wake is not None
        wake.holder = worker
        wake.token = self._token(sub, wake)
        self._arm_lease(sub, wake)
        return Reply(
            200,
            {
                "wake_id": wake.wake_id,
                "generation": wake.generation,
                "token": wake.token,
                "streams": self._stream_infos(sub, wake),
                "lease_ttl_ms": sub.config.lease_ms,
            },
        )

    def ack(self, sub_id: str, token: str | None, body: object) -> Reply:
        """A pull-wake holder's ack: a heartbeat, or with ``done`` the end of its claim."""
        sub = self._require(sub_id, kind="pull-wake")
        wake, request = self._fence(sub, token, body)
        self._apply_acks(sub, request)
        return self._finish_or_extend(sub, wake, request)

    def release(self, sub_id: str, token: str | None, body: object) -> Reply:
        sub = self._require(sub_id, kind="pull-wake")
        self._fence(sub, token, body, fields=("wake_id", "generation"))
        self._end_wake(sub)
        self._maybe_wake(sub)
        return Reply(204)

    def _finish_or_extend(self, sub: Subscription, wake: Wake, body: dict[str, Any]) -> Reply:
        if body.get("done") is True:
            self._end_wake(sub)
            return Reply(200, {"ok": True, "next_wake": self._maybe_wake(sub)})
        self._arm_lease(sub, wake)
        return Reply(200, {"ok": True, "next_wake": False})

    def _fence(
        self,
        sub: Subscription,
        token: str | None,
        body: object,
        fields: tuple[str, ...] = ("wake_id", "generation", "acks", "done"),
    ) -> tuple[Wake, dict[str, Any]]:
        """The open wake this request may act on, and the request; 400, 401 or 409
        ``FENCED`` otherwise."""
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object")
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise invalid(f"unknown field(s): {', '.join(unknown)}")
        wake_id, generation = body.get("wake_id"), body.get("generation")
        if not isinstance(wake_id, str) or isinstance(generation, bool):
            raise invalid("wake_id (a string) and generation (an integer) are required")
        if not isinstance(generation, int):
            raise invalid("wake_id (a string) and generation (an integer) are required")
        if "done" in body and not isinstance(body["done"], bool):
            raise invalid("done must be true or false")
        if token is None:
            raise SubscriptionError(401, "TOKEN_INVALID", "Authorization: Bearer <token> required")
        claims = self._verify_token(sub, token)
        wake = sub.wake
        if (
            wake is None
            or wake.token is None
            or claims != (wake.generation, wake.wake_id)
            or (generation, wake_id) != (wake.generation, wake.wake_id)
        ):
            current = wake.generation if wake is not None else sub.generation
            raise SubscriptionError(
                409,
                "FENCED",
                f"wake {wake_id!r} of generation {generation} is not the open wake",
                generation=current,
            )
        return wake, body

    def _apply_acks(self, sub: Subscription, body: dict[str, Any]) -> None:
        """Move cursors to the acked offsets: all of them, or (on any refusal) none."""
        acks = body.get("acks", [])
        if not isinstance(acks, list):
            raise invalid("acks must be an array")
        moves: list[tuple[Link, int | None, int]] = []
        for ack in acks:
            if not isinstance(ack, dict) or set(ack) - {"stream", "path", "offset"}:
                raise invalid('each ack is {"stream": <path>, "offset": <offset>}')
            path, offset = ack.get("stream", ack.get("path")), ack.get("offset")
            if not isinstance(path, str) or not isinstance(offset, str):
                raise invalid('each ack is {"stream": <path>, "offset": <offset>}')
            link = sub.links.get(path)
            if link is None:
                raise SubscriptionError(
                    409, "INVALID_OFFSET", f"{path!r} is not a stream of this subscription"
                )
            state = self._stream(path)
            if state is None:
                if offset != ZERO_OFFSET:
                    raise SubscriptionError(
                        409, "INVALID_OFFSET", f"{path!r} does not exist: only {ZERO_OFFSET}"
                    )
                moves.append((link, None, 0))
                continue
            try:
                position = self.store.resolve_offset(state, offset)
            except ProtocolError as exc:
                status = 409 if exc.status == 410 else 400
                raise SubscriptionError(
                    status, "INVALID_OFFSET", f"ack of {path!r}: {exc.message}"
                ) from None
            if position < self._acked(link, state):
                raise SubscriptionError(
                    409, "INVALID_OFFSET", f"ack of {path!r} would move its cursor back"
                )
            moves.append((link, state.incarnation, position))
        for link, incarnation, position in moves:
            link.incarnation, link.acked = incarnation, position
        if moves:
            self._save()

    # ------------------------------------------------------------------ wakes: opening, ending

    def _pending(self, sub: Subscription) -> bool:
        return any(info["has_pending"] for info in self._stream_infos(sub))

    def _maybe_wake(self, sub: Subscription) -> bool:
        """Open a wake if work is pending and none is open; whether one opened."""
        if sub.wake is not None or not self.active or not self._pending(sub):
            return False
        self._open_wake(sub)
        return True

    def _open_wake(self, sub: Subscription) -> None:
        sub.generation += 1
        snapshot = {}
        for path in sub.links:
            state = self._stream(path)
            if state is not None:
                snapshot[path] = (state.incarnation, state.tail)
        wake = Wake(f"w_{secrets.token_hex(12)}", sub.generation, snapshot)
        sub.wake = wake
        self._save()  # generations never repeat, across restarts too
        if sub.config.kind == "webhook":
            wake.token = self._token(sub, wake)
            if sub.delivery is None or sub.delivery.done():
                sub.delivery = asyncio.get_running_loop().create_task(
                    self._deliver(sub), name=f"webhook {sub.id}"
                )
        else:
            self._write_wake_event(sub, wake)

    def _end_wake(self, sub: Subscription) -> None:
        wake, sub.wake = sub.wake, None
        if wake is not None and wake.lease is not None:
            wake.lease.cancel()

    def _arm_lease(self, sub: Subscription, wake: Wake) -> None:
        if wake.lease is not None:
            wake.lease.cancel()
        wake.lease = asyncio.get_running_loop().call_later(
            sub.config.lease_ms / 1000, self._lease_expired, sub, wake
        )

    def _lease_expired(self, sub: Subscription, wake: Wake) -> None:
        if sub.wake is not wake or self._subscriptions.get(sub.id) is not sub:
            return
        log.info("subscription %s: the lease of generation %d expired", sub.id, wake.generation)
        wake.lease = None
        self._end_wake(sub)
        self._maybe_wake(sub)

    def _write_wake_event(self, sub: Subscription, wake: Wake) -> None:
        assert sub.config.wake_stream is not None
        path = P.STREAM_PATH_PREFIX + sub.config.wake_stream
        state = self.store.get(path)
        if state is None or state.soft_deleted:
            log.warning("subscription %s: wake stream %s does not exist", sub.id, path)
            return
        pending = [info["path"] for info in self._stream_infos(sub, wake) if info["has_pending"]]
        event = {
            "type": "wake",
            "subscription_id": sub.id,
            "stream": pending[0] if pending else None,
            "streams": pending,
            "wake_id": wake.wake_id,
            "generation": wake.generation,
            "ts": int(time.time() * 1000),
        }
        body = json.dumps(event, separators=(",", ":")).encode()
        try:
            self.store.append(path, AppendRequest(body, content_type=state.content_type))
        except ProtocolError as exc:
            log.warning("subscription %s: wake event not written to %s: %s", sub.id, path, exc)

    # ------------------------------------------------------------------ webhook delivery

    async def _deliver(self, sub: Subscription) -> None:
        """POST the open wake until a receiver accepts it; retries with backoff.

        One task per subscription. It ends when no wake is open, the subscription is
        deleted or the server stops; a wake opened while it runs is posted by it too.
        """
        while self.active and self._subscriptions.get(sub.id) is sub:
            wake = sub.wake
            if wake is None or wake.token is None:
                return
            if wake.lease is not None:  # accepted already; the lease now decides
                return
            body = self._wake_body(sub, wake)
            if self._client is None:
                self._client = self._client_factory()
            assert sub.config.webhook_url is not None
            delivery = await post_webhook(self._client, sub.config.webhook_url, body, self.key)
            if self._subscriptions.get(sub.id) is not sub:
                return
            if delivery.accepted:
                sub.status, sub.attempts, sub.next_attempt_at = "active", 0, None
                if sub.wake is not wake:
                    continue  # the receiver called back before it answered
                if delivery.done:
                    self._auto_ack(sub, wake)
                    self._end_wake(sub)
                    self._maybe_wake(sub)
                elif wake.lease is None:
                    self._arm_lease(sub, wake)
                continue
            sub.attempts += 1
            delay = retry_delay(sub.attempts)
            sub.status, sub.next_attempt_at = "failed", time.time() + delay
            log.warning(
                "subscription %s: webhook delivery failed (%s); retry %d in %.1f s",
                sub.id,
                delivery.problem,
                sub.attempts,
                delay,
            )
            await asyncio.sleep(delay)

    def _wake_body(self, sub: Subscription, wake: Wake) -> bytes:
        payload = {
            "subscription_id": sub.id,
            "wake_id": wake.wake_id,
            "generation": wake.generation,
            "streams": self._stream_infos(sub, wake),
            "callback_url": self.action_url(sub, "callback"),
            "callback_token": wake.token,
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    def _auto_ack(self, sub: Subscription, wake: Wake) -> None:
        """``{"done": true}``: every cursor moves to the tail in the wake's snapshot."""
        for path, (incarnation, tail) in wake.snapshot.items():
            link = sub.links.get(path)
            state = self._stream(path)
            if link is None or state is None or state.incarnation != incarnation:
                continue
            if tail > self._acked(link, state):
                link.incarnation, link.acked = incarnation, tail
        self._save()

    # ------------------------------------------------------------------ tokens

    def _token(self, sub: Subscription, wake: Wake) -> str:
        claims = {"sub": sub.id, "n": sub.nonce, "gen": wake.generation, "wake": wake.wake_id}
        payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(self._token_secret, payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{b64url(mac)}"

    def _verify_token(self, sub: Subscription, token: str) -> tuple[int, str]:
        """(generation, wake_id) of a token this server signed for ``sub``; 401 otherwise."""
        payload, _, mac = token.partition(".")
        expected = b64url(hmac.new(self._token_secret, payload.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            raise SubscriptionError(401, "TOKEN_INVALID", "the token is not valid")
        claims = json.loads(_unb64url(payload))
        if claims.get("sub") != sub.id or claims.get("n") != sub.nonce:
            raise SubscriptionError(401, "TOKEN_INVALID", "the token is for another subscription")
        return int(claims["gen"]), str(claims["wake"])

    # ------------------------------------------------------------------ streams

    def _stream_changed(self, full_path: str) -> None:
        """The store's hook: a stream was created, appended to, closed or deleted."""
        if not self._subscriptions or not self.active:
            return
        self._changed.add(full_path)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._process_changes)

    def _process_changes(self) -> None:
        self._scheduled = False
        changed, self._changed = self._changed, set()
        paths = [p for p in (_relative(full) for full in changed) if p is not None]
        relinked = False
        for sub in list(self._subscriptions.values()):
            for path in paths:
                state = self._stream(path)
                if state is None:
                    link = sub.links.get(path)
                    if link is not None and not link.explicit:
                        del sub.links[path]  # a deleted stream leaves its glob
                        relinked = True
                elif path not in sub.links and self._glob_wants(sub, path):
                    # Discovered by this change: linked before it, so it wakes.
                    sub.links[path] = Link(path, False, True, state.incarnation, 0)
                    relinked = True
            try:
                self._maybe_wake(sub)
            except Exception:  # one subscription's trouble must not stop the others
                log.exception("subscription %s: could not wake", sub.id)
        if relinked:
            self._save()

    # ------------------------------------------------------------------ persistence

    def _save(self) -> None:
        """Write every subscription's config, links, cursors and generation (not its
        open wake, lease or retry schedule) to ``state_file``, atomically."""
        if self.state_file is None:
            return
        state = {
            "version": 1,
            "token_secret": self._token_secret.hex(),
            "subscriptions": [
                {
                    "id": sub.id,
                    "config": dataclasses.asdict(sub.config),
                    "base_url": sub.base_url,
                    "created_at": sub.created_at,
                    "nonce": sub.nonce,
                    "generation": sub.generation,
                    "links": [dataclasses.asdict(link) for link in sub.links.values()],
                }
                for sub in self._subscriptions.values()
            ],
        }
        partial = self.state_file.with_suffix(".tmp")
        try:
            partial.write_text(json.dumps(state, separators=(",", ":")))
            partial.chmod(0o600)  # it holds the token secret
            partial.replace(self.state_file)
        except OSError:  # the API keeps working; the next save tries again
            log.exception("subscriptions: could not save %s", self.state_file)

    def _load(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return
        self._token_secret = bytes.fromhex(state["token_secret"])
        for item in state["subscriptions"]:
            config = item["config"]
            config["streams"] = tuple(config["streams"])
            sub = Subscription(
                item["id"],
                SubscriptionConfig(**config),
                item["base_url"],
                item["created_at"],
                nonce=item["nonce"],
                generation=item["generation"],
            )
            for link in item["links"]:
                sub.links[link["path"]] = Link(**link)
            self._subscriptions[sub.id] = sub

    def _glob_wants(self, sub: Subscription, path: str) -> bool:
        pattern = sub.config.pattern
        return pattern is not None and path != sub.config.wake_stream and glob_match(pattern, path)

    def _link(self, sub: Subscription, path: str, *, explicit: bool) -> None:
        """Link ``path`` at its current tail (an already linked stream keeps its cursor)."""
        link = sub.links.get(path)
        if link is None:
            state = self._stream(path)
            incarnation = state.incarnation if state is not None else None
            link = Link(path, False, False, incarnation, state.tail if state is not None else 0)
            sub.links[path] = link
        if explicit:
            link.explicit = True
        else:
            link.glob = True

    def _stream(self, path: str) -> StreamState | None:
        state = self.store.get(P.STREAM_PATH_PREFIX + path)
        return None if state is None or state.soft_deleted else state

    @staticmethod
    def _acked(link: Link, state: StreamState) -> int:
        return link.acked if link.incarnation == state.incarnation else 0

    def _stream_infos(self, sub: Subscription, wake: Wake | None = None) -> list[dict[str, Any]]:
        """Each link's cursor and tail (the tail of ``wake``'s snapshot, if given)."""
        infos = []
        for link in sub.links.values():
            state = self._stream(link.path)
            if state is None:
                acked_offset = tail_offset = ZERO_OFFSET
                pending = False
            else:
                acked = self._acked(link, state)
                tail = state.tail
                if wake is not None and link.path in wake.snapshot:
                    incarnation, snapshot_tail = wake.snapshot[link.path]
                    if incarnation == state.incarnation:
                        tail = snapshot_tail
                acked_offset, tail_offset = state.offset(acked), state.offset(tail)
                pending = tail > acked
            infos.append(
                {
                    "path": link.path,
                    "link_type": "explicit" if link.explicit else "glob",
                    "acked_offset": acked_offset,
                    "tail_offset": tail_offset,
                    "has_pending": pending,
                }
            )
        return infos

    def _require(self, sub_id: str, kind: Kind | None = None) -> Subscription:
        sub = self._subscriptions.get(sub_id)
        if sub is None:
            raise not_found()
        if kind is not None and sub.config.kind != kind:
            raise invalid(f"this is a {sub.config.kind} subscription, not {kind}")
        return sub


def check_id(sub_id: str) -> None:
    if not _ID_RE.match(sub_id):
        raise invalid("a subscription id is 1 to 200 URL-safe characters")


def _relative(full_path: str) -> str | None:
    """``events/abc`` for ``/v1/stream/events/abc``; None outside the stream root."""
    if not full_path.startswith(P.STREAM_PATH_PREFIX):
        return None
    return full_path[len(P.STREAM_PATH_PREFIX) :] or None


def _unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise SubscriptionError(401, "TOKEN_INVALID", "the token is not valid") from None


def _iso(stamp: float) -> str:
    return (
        datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
