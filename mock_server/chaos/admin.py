"""The chaos admin endpoint: change a running server's fault plan over HTTP.

Mounted on the server only when asked for (``python -m mock_server --chaos``,
``serve_chaos(admin=True)``, ``ServerFaults(app, admin=True)``); never fault-injected.

============================  =============================================================
``GET /_chaos/plan``          the current plan, as JSON
``PUT /_chaos/plan``          replace it (JSON body, or YAML with a ``yaml`` content type);
                              ``200`` with the plan, ``400`` with the validation errors
``DELETE /_chaos/plan``       no plan (``204``)
``POST /_chaos/trim``         ``{"path": "chat-1", "keep_last": 0}``: retention now;
                              ``200`` ``{"trimmed_to": "<offset>"}``
``POST /_chaos/reset``        no plan, counters and log cleared (``204``)
``GET /_chaos/log``           the faults applied so far, as a JSON list
============================  =============================================================

Only the server rules of a plan act on the server; proxy rules are kept (and
returned by ``GET``) but act only where a :class:`ChaosProxy` runs them.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from durable_client import wire as P

from .._asgi import App, Receive, Scope, Send
from .._http import respond
from .._store import ProtocolError, StreamStore
from ._rules import RuleBook
from .plan import FaultPlan

__all__ = ["admin_routes"]


_MAX_BODY = 1024 * 1024


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            raise ProtocolError(413, "admin request body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _json(send: Send, status: int, value: Any) -> None:
    body = json.dumps(value, indent=2).encode() + b"\n"
    await respond(
        send,
        status,
        [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
        body,
    )


async def _error(send: Send, status: int, message: str) -> None:
    await respond(
        send, status, [("Content-Type", "text/plain; charset=utf-8")], (message + "\n").encode()
    )


def _content_type(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-type":
            return str(value.decode("latin-1")).lower()
    return ""


def admin_routes(faults: RuleBook, store: StreamStore) -> dict[str, App]:
    """The admin handlers for ``DurableStreamsApp(extra_routes=...)``: they change
    the plan of the rule book ``faults`` and trim the streams of ``store``."""

    async def plan(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"].upper()
        if method == "GET":
            await _json(send, 200, json.loads(faults.plan.to_json()))
        elif method == "PUT":
            body = await _body(receive)
            try:
                if "yaml" in _content_type(scope):
                    new = FaultPlan.from_yaml(body.decode("utf-8"))
                else:
                    new = FaultPlan.from_json(body)
                faults.set_plan(new)
            except ValidationError as exc:
                await _error(send, 400, f"invalid fault plan:\n{exc}")
                return
            except (ValueError, UnicodeDecodeError) as exc:
                await _error(send, 400, f"invalid fault plan: {exc}")
                return
            await _json(send, 200, json.loads(faults.plan.to_json()))
        elif method == "DELETE":
            faults.set_plan(FaultPlan())
            await respond(send, 204)
        else:
            await _error(send, 405, "use GET, PUT or DELETE on /_chaos/plan")

    async def trim(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"].upper() != "POST":
            await _error(send, 405, "use POST on /_chaos/trim")
            return
        try:
            request = json.loads(await _body(receive))
            path = str(request["path"])
            keep_last = int(request.get("keep_last", 0))
        except (ValueError, KeyError, TypeError):
            await _error(send, 400, 'send {"path": "<stream path>", "keep_last": <n>}')
            return
        if not path.startswith("/"):
            path = P.STREAM_PATH_PREFIX + path
        try:
            floor = store.trim(path, max(0, keep_last))
        except ProtocolError as exc:
            await _error(send, exc.status, exc.message)
            return
        trimmed_to = store.require(path).offset(floor)
        await _json(send, 200, {"path": path, "trimmed_to": trimmed_to})

    async def reset(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"].upper() != "POST":
            await _error(send, 405, "use POST on /_chaos/reset")
            return
        faults.reset()
        await respond(send, 204)

    async def log(scope: Scope, receive: Receive, send: Send) -> None:
        await _json(send, 200, [json.loads(r.model_dump_json()) for r in faults.log])

    return {
        "/_chaos/plan": plan,
        "/_chaos/trim": trim,
        "/_chaos/reset": reset,
        "/_chaos/log": log,
    }
