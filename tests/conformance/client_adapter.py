#!/usr/bin/env python3
"""Adapter for the Durable Streams client conformance suite (durable_client).

The upstream suite (``packages/client-conformance-tests`` in the
durable-streams repository) starts its own Node reference server and drives a
client through this process: one JSON command per line on stdin, one JSON
result per line on stdout. Run it with the project's Python::

    .venv/bin/python tests/conformance/client_adapter.py

Every command is carried out with the public ``durable_client`` API
(``DurableStream``, ``IdempotentProducer``, ``RetryPolicy``). The features
declared in ``init`` are the ones the SDK really has:

- ``batching``: ``IdempotentProducer`` batches appends (linger, byte/item limits).
- ``sse``, ``longPoll``, ``auto``: ``DurableStream.follow(live=...)``; auto
  catches up with plain reads, then tails with SSE.
- ``streaming``: reads deliver batches as they arrive.
- ``dynamicHeaders``: headers and query parameters may be functions called
  per request (token refresh); the adapter resolves the suite's counters once
  per command, as the reference TypeScript adapter does.
- ``retryOptions``: ``RetryPolicy`` validates its options.
- ``batchItems``: ``IdempotentProducer(max_batch_items=...)``.
- ``strictZeroValidation``: zero sizes and delays are rejected, not defaulted.

Not supported: ``benchmark`` (answers NOT_SUPPORTED).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from durable_client import (  # noqa: E402
    BadRequest,
    DurableError,
    ProtocolViolation,
    RequestTimeout,
    RetryPolicy,
    SequenceConflict,
    SequenceGap,
    ServerBusy,
    StreamClosed,
    StreamConflict,
    StreamNotFound,
    TransportError,
    UsageError,
    __version__,
)
from durable_client.streams import DurableStream, IdempotentProducer  # noqa: E402

DEFAULT_CONTENT_TYPE = "application/octet-stream"

FEATURES = {
    "batching": True,
    "sse": True,
    "longPoll": True,
    "auto": True,
    "streaming": True,
    "dynamicHeaders": True,
    "retryOptions": True,
    "batchItems": True,
    "strictZeroValidation": True,
}

# Python parameter names -> the suite's option names, for validation messages.
OPTION_NAMES = {
    "max_attempts": "maxRetries",
    "initial_delay": "initialDelayMs",
    "max_delay": "maxDelayMs",
    "multiplier": "multiplier",
    "producer_id": "producerId",
    "epoch": "epoch",
    "max_batch_bytes": "maxBatchBytes",
    "max_batch_items": "maxBatchItems",
}


class CommandError(Exception):
    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class Adapter:
    def __init__(self) -> None:
        self.server_url = ""
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        self.content_types: dict[str, str] = {}
        self.producers: dict[tuple[str, str, int], IdempotentProducer] = {}
        self.dynamic_headers: dict[str, dict[str, Any]] = {}
        self.dynamic_params: dict[str, dict[str, Any]] = {}

    # --- helpers ---------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.server_url}{path}"

    def stream(
        self,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> DurableStream:
        return DurableStream(
            self.url(path),
            client=self.client,
            content_type=content_type or self.content_types.get(path),
            headers=headers,
            params=params,
        )

    def resolve_dynamic(self) -> tuple[dict[str, str], dict[str, str]]:
        """Evaluate the configured dynamic headers and params once (per command)."""

        def value(config: dict[str, Any]) -> str:
            kind = config["type"]
            if kind == "counter":
                config["counter"] += 1
                return str(config["counter"])
            if kind == "timestamp":
                return str(int(time.time() * 1000))
            return str(config.get("token") or "")

        headers = {name: value(cfg) for name, cfg in self.dynamic_headers.items()}
        params = {name: value(cfg) for name, cfg in self.dynamic_params.items()}
        return headers, params

    def producer(
        self, path: str, producer_id: str, epoch: int, auto_claim: bool
    ) -> IdempotentProducer:
        key = (path, producer_id, epoch)
        producer = self.producers.get(key)
        if producer is None:
            producer = IdempotentProducer(
                self.stream(path, content_type=self.content_types.get(path, DEFAULT_CONTENT_TYPE)),
                producer_id,
                epoch=epoch,
                auto_claim=auto_claim,
                linger=0,
                max_in_flight=1,
            )
            self.producers[key] = producer
        return producer

    # --- commands --------------------------------------------------------------------

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        kind = cmd.get("type", "")
        handler = getattr(self, "cmd_" + kind.replace("-", "_"), None)
        if handler is None:
            return error(kind, "NOT_SUPPORTED", f"unknown command type: {kind}")
        try:
            result: dict[str, Any] = await handler(cmd)
        except CommandError as exc:
            return error(kind, exc.code, str(exc), exc.status)
        except DurableError as exc:
            return error(kind, error_code(exc, kind), str(exc), exc.status)
        except Exception as exc:  # a bug in the adapter or the SDK: say so
            return error(kind, "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}")
        return result

    async def cmd_init(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.server_url = cmd["serverUrl"].rstrip("/")
        self.content_types.clear()
        self.producers.clear()
        self.dynamic_headers.clear()
        self.dynamic_params.clear()
        return {
            "type": "init",
            "success": True,
            "clientName": "durable-sessions-python",
            "clientVersion": __version__,
            "features": FEATURES,
        }

    async def cmd_shutdown(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"type": "shutdown", "success": True}

    async def cmd_create(self, cmd: dict[str, Any]) -> dict[str, Any]:
        path = cmd["path"]
        content_type = cmd.get("contentType") or DEFAULT_CONTENT_TYPE
        stream = self.stream(path, headers=cmd.get("headers"), content_type=content_type)
        result = await stream.create(
            content_type=content_type,
            ttl_seconds=cmd.get("ttlSeconds"),
            expires_at=cmd.get("expiresAt"),
            closed=bool(cmd.get("closed")),
            data=cmd.get("data"),
        )
        self.content_types[path] = content_type
        return {"type": "create", "success": True, "status": result.status, "offset": result.offset}

    async def cmd_connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        path = cmd["path"]
        head = await self.stream(path, headers=cmd.get("headers")).head()
        if head.content_type:
            self.content_types[path] = head.content_type
        return {"type": "connect", "success": True, "status": 200, "offset": head.offset}

    async def cmd_head(self, cmd: dict[str, Any]) -> dict[str, Any]:
        path = cmd["path"]
        head = await self.stream(path, headers=cmd.get("headers")).head()
        if head.content_type:
            self.content_types[path] = head.content_type
        result: dict[str, Any] = {
            "type": "head",
            "success": True,
            "status": 200,
            "offset": head.offset,
            "contentType": head.content_type,
            "streamClosed": head.closed,
        }
        if head.ttl_seconds is not None:
            result["ttlSeconds"] = head.ttl_seconds
        if head.expires_at is not None:
            result["expiresAt"] = head.expires_at
        return result

    async def cmd_delete(self, cmd: dict[str, Any]) -> dict[str, Any]:
        path = cmd["path"]
        await self.stream(path, headers=cmd.get("headers")).delete()
        self.content_types.pop(path, None)
        return {"type": "delete", "success": True, "status": 200}

    async def cmd_append(self, cmd: dict[str, Any]) -> dict[str, Any]:
        path = cmd["path"]
        dyn_headers, dyn_params = self.resolve_dynamic()
        headers = {**dyn_headers, **(cmd.get("headers") or {})}
        stream = self.stream(
            path,
            headers=headers,
            params=dyn_params,
            content_type=self.content_types.get(path, DEFAULT_CONTENT_TYPE),
        )
        body = decode_data(cmd)
        seq = cmd.get("seq")
        result = await stream.append(body, seq=None if seq is None else str(seq))
        out: dict[str, Any] = {
            "type": "append",
            "success": True,
            "status": 200,
            "offset": result.offset,
        }
        if dyn_headers:
            out["headersSent"] = dyn_headers
        if dyn_params:
            out["paramsSent"] = dyn_params
        return out

    async def cmd_close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        path = cmd["path"]
        content_type = cmd.get("contentType") or self.content_types.get(path)
        stream = self.stream(path, content_type=content_type)
        result = await stream.close(cmd.get("data"), content_type=content_type)
        return {"type": "close", "success": True, "finalOffset": result.final_offset or ""}

    async def cmd_read(self, cmd: dict[str, Any]) -> dict[str, Any]:
        path = cmd["path"]
        dyn_headers, dyn_params = self.resolve_dynamic()
        headers = {**dyn_headers, **(cmd.get("headers") or {})}
        stream = self.stream(path, headers=headers, params=dyn_params)
        live = cmd.get("live", False)
        if live is True:
            live = "auto"
        timeout = (cmd.get("timeoutMs") or 5000) / 1000
        max_chunks = cmd.get("maxChunks") or 100
        wait_up_to_date = bool(cmd.get("waitForUpToDate"))
        offset = cmd.get("offset") or "-1"

        chunks: list[dict[str, Any]] = []
        status: int | None = None
        final_offset = offset
        up_to_date = False
        closed = False
        cursor: str | None = None
        is_json = False

        async def collect() -> None:
            nonlocal status, final_offset, up_to_date, closed, cursor, is_json
            follow = stream.follow(offset, live=live)
            try:
                async for batch in follow:
                    if status is None:
                        status = batch.status
                    final_offset = batch.offset
                    up_to_date = batch.up_to_date
                    closed = batch.closed
                    cursor = batch.cursor or cursor
                    if batch.items is not None:
                        is_json = True
                        if batch.items:
                            chunks.append(
                                {"data": compact_json(batch.items), "offset": batch.offset}
                            )
                    elif batch.data:
                        chunks.append(
                            {"data": batch.data.decode("utf-8", "replace"), "offset": batch.offset}
                        )
                    if live is False:
                        continue
                    if len(chunks) >= max_chunks or (wait_up_to_date and batch.up_to_date):
                        return
            finally:
                await follow.aclose()

        if live is False:
            await collect()
        else:
            try:
                await asyncio.wait_for(collect(), timeout)
            except TimeoutError:
                up_to_date = True  # nothing more arrived in time: caught up
        if stream.content_type:
            self.content_types.setdefault(path, stream.content_type)
        del is_json
        result: dict[str, Any] = {
            "type": "read",
            "success": True,
            "status": status if status is not None else 200,
            "chunks": chunks,
            "offset": final_offset,
            "upToDate": up_to_date,
            "streamClosed": closed,
        }
        if cursor is not None:
            result["cursor"] = cursor
        if dyn_headers:
            result["headersSent"] = dyn_headers
        if dyn_params:
            result["paramsSent"] = dyn_params
        return result

    async def cmd_idempotent_append(self, cmd: dict[str, Any]) -> dict[str, Any]:
        producer = self.producer(
            cmd["path"], cmd["producerId"], cmd.get("epoch", 0), bool(cmd.get("autoClaim"))
        )
        future = producer.append(cmd["data"])
        await producer.flush()
        result = await future
        out: dict[str, Any] = {
            "type": "idempotent-append",
            "success": True,
            "status": 200,
            "offset": result.offset,
            "duplicate": result.duplicate,
        }
        if result.producer_seq is not None:
            out["producerSeq"] = result.producer_seq
        return out

    async def cmd_idempotent_append_batch(self, cmd: dict[str, Any]) -> dict[str, Any]:
        path = cmd["path"]
        max_in_flight = cmd.get("maxInFlight") or 1
        concurrent = max_in_flight > 1
        producer = IdempotentProducer(
            self.stream(
                path,
                headers=cmd.get("headers"),
                content_type=self.content_types.get(path, DEFAULT_CONTENT_TYPE),
            ),
            cmd["producerId"],
            epoch=cmd.get("epoch", 0),
            auto_claim=bool(cmd.get("autoClaim")),
            max_in_flight=max_in_flight,
            # To exercise pipelining, one item per request; otherwise one batch.
            linger=0 if concurrent else 1.0,
            max_batch_bytes=1 if concurrent else 1024 * 1024,
        )
        try:
            for item in cmd["items"]:
                producer.append(item)
            await producer.flush()
            await producer.detach()
        except BaseException:
            await producer.aclose()
            raise
        return {"type": "idempotent-append-batch", "success": True, "status": 200}

    async def cmd_idempotent_close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        producer = self.producer(
            cmd["path"], cmd["producerId"], cmd.get("epoch", 0), bool(cmd.get("autoClaim"))
        )
        result = await producer.close(cmd.get("data"))
        return {
            "type": "idempotent-close",
            "success": True,
            "status": 200,
            "finalOffset": result.offset,
        }

    async def cmd_idempotent_detach(self, cmd: dict[str, Any]) -> dict[str, Any]:
        key = (cmd["path"], cmd["producerId"], cmd.get("epoch", 0))
        producer = self.producers.pop(key, None)
        if producer is not None:
            await producer.detach()
        return {"type": "idempotent-detach", "success": True, "status": 200}

    async def cmd_set_dynamic_header(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.dynamic_headers[cmd["name"]] = {
            "type": cmd["valueType"],
            "counter": 0,
            "token": cmd.get("initialValue"),
        }
        return {"type": "set-dynamic-header", "success": True}

    async def cmd_set_dynamic_param(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.dynamic_params[cmd["name"]] = {"type": cmd["valueType"], "counter": 0}
        return {"type": "set-dynamic-param", "success": True}

    async def cmd_clear_dynamic(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.dynamic_headers.clear()
        self.dynamic_params.clear()
        return {"type": "clear-dynamic", "success": True}

    async def cmd_validate(self, cmd: dict[str, Any]) -> dict[str, Any]:
        target = cmd.get("target") or {}
        try:
            if target.get("target") == "retry-options":
                kwargs: dict[str, Any] = {}
                if "maxRetries" in target:
                    kwargs["max_attempts"] = target["maxRetries"] + 1
                if "initialDelayMs" in target:
                    kwargs["initial_delay"] = target["initialDelayMs"] / 1000
                if "maxDelayMs" in target:
                    kwargs["max_delay"] = target["maxDelayMs"] / 1000
                elif "initial_delay" in kwargs:
                    kwargs["max_delay"] = max(5.0, kwargs["initial_delay"])
                if "multiplier" in target:
                    kwargs["multiplier"] = target["multiplier"]
                RetryPolicy(**kwargs)
            elif target.get("target") == "idempotent-producer":
                options: dict[str, Any] = {}
                if "epoch" in target:
                    options["epoch"] = target["epoch"]
                if "maxBatchBytes" in target:
                    options["max_batch_bytes"] = target["maxBatchBytes"]
                if "maxBatchItems" in target:
                    options["max_batch_items"] = target["maxBatchItems"]
                IdempotentProducer(
                    self.stream("/validate-only"),
                    target.get("producerId", "test-producer"),
                    **options,
                )
            else:
                raise CommandError("NOT_SUPPORTED", f"unknown validation target: {target}")
        except UsageError as exc:
            text = str(exc)
            names = [camel for py, camel in OPTION_NAMES.items() if py in text]
            raise CommandError("INVALID_ARGUMENT", f"{', '.join(names)}: {text}") from exc
        return {"type": "validate", "success": True}

    async def cmd_benchmark(self, cmd: dict[str, Any]) -> dict[str, Any]:
        raise CommandError("NOT_SUPPORTED", "benchmarks are not implemented by this adapter")


def decode_data(cmd: dict[str, Any]) -> bytes:
    data = cmd.get("data") or ""
    if cmd.get("binary"):
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CommandError("INVALID_ARGUMENT", "binary data is not base64") from exc
    return str(data).encode("utf-8")


def compact_json(items: tuple[Any, ...]) -> str:
    return json.dumps(list(items), separators=(",", ":"), ensure_ascii=False)


def error_code(exc: DurableError, command: str) -> str:
    if isinstance(exc, StreamNotFound):
        return "NOT_FOUND"
    if isinstance(exc, StreamClosed):
        return "STREAM_CLOSED"
    if isinstance(exc, SequenceConflict | SequenceGap):
        return "SEQUENCE_CONFLICT"
    if isinstance(exc, StreamConflict):
        return "CONFLICT"
    if isinstance(exc, BadRequest):
        return "INVALID_OFFSET" if command == "read" else "UNEXPECTED_STATUS"
    if isinstance(exc, ProtocolViolation):
        return "PARSE_ERROR"
    if isinstance(exc, UsageError):
        return "INVALID_ARGUMENT"
    if isinstance(exc, RequestTimeout):
        return "TIMEOUT"
    if isinstance(exc, TransportError):
        return "NETWORK_ERROR"
    if isinstance(exc, ServerBusy):
        return "UNEXPECTED_STATUS"
    return "UNEXPECTED_STATUS" if exc.status is not None else "INTERNAL_ERROR"


def error(command: str, code: str, message: str, status: int | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "type": "error",
        "success": False,
        "commandType": command,
        "errorCode": code,
        "message": message,
    }
    if status is not None:
        result["status"] = status
    return result


def dump(result: dict[str, Any]) -> str:
    # The runner reads one JSON object per line; U+2028/2029 must not split it.
    return json.dumps(result).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


async def main() -> None:
    adapter = Adapter()
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
            except json.JSONDecodeError as exc:
                print(dump(error("init", "PARSE_ERROR", f"bad command: {exc}")), flush=True)
                continue
            result = await adapter.handle(cmd)
            print(dump(result), flush=True)
            if cmd.get("type") == "shutdown":
                break
    finally:
        for producer in adapter.producers.values():
            await producer.aclose()
        await adapter.client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
