"""The HTTP front end of the reserved control API, ``{root}/__ds/...`` (protocol section 6).

``DurableStreamsApp`` hands every request under ``/v1/stream/__ds`` here when
subscriptions are on, before any stream route, so no such path is ever a stream.
Every answer is JSON; every refusal is ``{"error": {"code", "message"}}``:

    GET    __ds/jwks.json                       the webhook signing keys
    PUT    __ds/subscriptions/<id>              create (201) or re-confirm (200); 409 if different
    GET    __ds/subscriptions/<id>              the subscription and its cursors
    DELETE __ds/subscriptions/<id>              204
    POST   __ds/subscriptions/<id>/streams      link streams explicitly (204)
    DELETE __ds/subscriptions/<id>/streams/<p>  unlink one (204; a glob link stays)
    POST   __ds/subscriptions/<id>/callback     webhook: ack / done (Bearer callback token)
    POST   __ds/subscriptions/<id>/claim        pull-wake: take the lease
    POST   __ds/subscriptions/<id>/ack          pull-wake: ack, heartbeat, done (Bearer claim token)
    POST   __ds/subscriptions/<id>/release      pull-wake: give the lease back (Bearer claim token)
"""

from __future__ import annotations

import json
from typing import Any, Final

from durable_client import wire as P

from ._asgi import Send
from ._http import Request, _BodyTooLarge, respond
from ._json_depth import MAX_JSON_DEPTH, nesting_exceeds
from ._subscriptions import Reply, SubscriptionError, SubscriptionManager, invalid

MAX_CONTROL_BODY: Final = 256 * 1024

_ROOT: Final = P.STREAM_PATH_PREFIX + P.RESERVED_PREFIX
_JSON: Final = ("Content-Type", "application/json")


class ControlApi:
    """The ``__ds`` routes over a ``SubscriptionManager``."""

    def __init__(self, manager: SubscriptionManager) -> None:
        self.manager = manager

    async def __call__(self, req: Request, send: Send) -> None:
        headers: list[tuple[str, str]] = []
        try:
            reply = await self._route(req, headers)
        except SubscriptionError as exc:
            reply = Reply(exc.status, exc.body())
        except _BodyTooLarge:
            reply = Reply(
                413,
                SubscriptionError(
                    413, "PAYLOAD_TOO_LARGE", f"body larger than {MAX_CONTROL_BODY} bytes"
                ).body(),
            )
        if reply.body is None:
            await respond(send, reply.status, headers)
            return
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(_JSON)
        body = json.dumps(reply.body, separators=(",", ":"), ensure_ascii=False).encode()
        await respond(send, reply.status, headers, body)

    async def _route(self, req: Request, headers: list[tuple[str, str]]) -> Reply:
        rest = req.path[len(_ROOT) :]
        manager = self.manager
        if rest == "/jwks.json":
            _allow(req, headers, "GET")
            headers += [
                ("Content-Type", "application/jwk-set+json"),
                ("Cache-Control", "public, max-age=300"),
            ]
            return Reply(200, manager.key.jwks())
        parts = rest.split("/")  # ["", "subscriptions", id, action, ...]
        if len(parts) < 3 or parts[1] != "subscriptions" or not parts[2]:
            raise SubscriptionError(
                404, "NOT_FOUND", f"no control route {req.path} (see docs/subscriptions.md)"
            )
        sub_id, action = parts[2], parts[3:]
        if not action:
            _allow(req, headers, "PUT", "GET", "DELETE")
            if req.method == "PUT":
                return manager.put(sub_id, await _json_body(req), _base_url(req))
            if req.method == "GET":
                return manager.get(sub_id)
            return manager.delete(sub_id)
        if action[0] == "streams" and len(action) > 1:
            _allow(req, headers, "DELETE")
            return manager.remove_stream(sub_id, "/".join(action[1:]))
        if len(action) == 1 and action[0] in ("streams", "callback", "claim", "ack", "release"):
            _allow(req, headers, "POST")
            body = await _json_body(req)
            if action[0] == "streams":
                return manager.add_streams(sub_id, body)
            if action[0] == "claim":
                return manager.claim(sub_id, body)
            token = _bearer(req)
            if action[0] == "callback":
                return manager.callback(sub_id, token, body)
            if action[0] == "ack":
                return manager.ack(sub_id, token, body)
            return manager.release(sub_id, token, body)
        raise SubscriptionError(404, "NOT_FOUND", f"no control route {req.path}")


def _allow(req: Request, headers: list[tuple[str, str]], *methods: str) -> None:
    if req.method not in methods:
        headers.append(("Allow", ", ".join(methods)))
        raise SubscriptionError(
            405, "METHOD_NOT_ALLOWED", f"{req.method} is not allowed here ({', '.join(methods)})"
        )


async def _json_body(req: Request) -> Any:
    """The request's JSON (None for an empty body); 400 for anything that is not JSON."""
    raw = await req.body(MAX_CONTROL_BODY)
    if not raw.strip():
        return None
    if nesting_exceeds(raw, MAX_JSON_DEPTH):
        raise invalid(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid(f"the body is not JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bearer(req: Request) -> str | None:
    scheme, _, token = (req.header("authorization") or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _base_url(req: Request) -> str:
    """The server as the client addressed it, for the callback and JWKS URLs."""
    base = req.base_url()
    if base:
        return base
    host, port = req.scope.get("server") or ("127.0.0.1", 80)
    host = f"[{host}]" if ":" in str(host) else host
    return f"{req.scope.get('scheme', 'http')}://{host}:{port}"
