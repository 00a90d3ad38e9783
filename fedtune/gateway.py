"""The only part of `fedtune server` that the network reaches: a gateway to Flower's Fleet API.

Flower 1.41's SuperLink serves three APIs on one HTTP port (flwr/superlink/main.py, `create_app`):
the Fleet API for SuperNodes (`/v1/fleet/*`), the Control API for the `flwr` CLI (`/v1/control/*`:
start, stop and list runs, register node keys) and the Runtime API for the ServerApp
(`/v1/runtime/*`). The open-source SuperLink has no authentication on the Control API (its only
plugin is a no-op, flwr/superlink/config_loader.py), so whoever reaches that port can run code on
the server. `fedtune server` therefore binds the SuperLink to 127.0.0.1, and puts this gateway on
the public address: it terminates TLS and forwards exactly the calls a SuperNode makes, a `POST` to
one of the paths in flwr/supernode/fleet_http_client.py, to the SuperLink. Anything else is
refused with 403 and one log line naming the peer and what it asked for.

Plain HTTP routing by path, no protocol of fedtune's own: what reaches the SuperLink is the
SuperNode's request as it was sent (body and Flower's headers), on one of those twelve paths.
Bodies stream both ways; a request body larger than `max_request_bytes` is refused (413), as the
SuperLink would otherwise read it whole into memory. The gateway runs on a thread of the
`fedtune server` process, so the public port is open exactly while that process lives.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from flwr.common.constant import TIMESTAMP_HEADER
from flwr.supercore.constant import (
    FLEET_HTTP_PUBLIC_KEY_HEADER,
    FLEET_HTTP_SIGNATURE_HEADER,
    FLWR_COMPONENT_NAME_METADATA_KEY,
    FLWR_PACKAGE_NAME_METADATA_KEY,
    FLWR_PACKAGE_VERSION_METADATA_KEY,
)

from fedtune.text import printable

log = logging.getLogger("fedtune.gateway")

# Every call of Flower 1.41's SuperNode (flwr/supernode/fleet_http_client.py), all POST.
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
))
# The headers a SuperNode sends (its runtime-version and node-authentication interceptors, and
# httpx's content negotiation); nothing else is passed on.
FORWARDED_HEADERS = frozenset(name.lower() for name in (
    "content-type", "accept", "accept-encoding", "user-agent",
    FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER, TIMESTAMP_HEADER,
    FLWR_PACKAGE_NAME_METADATA_KEY, FLWR_PACKAGE_VERSION_METADATA_KEY, FLWR_COMPONENT_NAME_METADATA_KEY,
))
# Response headers that describe one connection, not the response (RFC 9110, 7.6.1), and the two
# the gateway's own HTTP server writes.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "date", "server"})
# The largest SuperNode request: an object chunk (Flower splits arrays into 5 MB chunks,
# FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) with its framing; fedtune's replies carry nothing larger.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024  # request line and headers; a SuperNode sends under 1 KB
MAX_CONNECTIONS = 1024  # beyond this, new requests get 503 at once instead of queueing
_LOGGED_CHARS = 120  # of a refused path, in the log line

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "an unknown peer"


def _printable(text: str) -> str:
    # The path comes from the peer: never let it write lines of its own into the log.
    return printable(text, _LOGGED_CHARS, escaped=True)


async def _answer(send: Send, status: int, text: str) -> None:
    body = text.encode() + b"\n"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FleetGateway:
    """ASGI app: forward a SuperNode's Fleet API calls to the SuperLink at `upstream`, refuse the rest."""

    def __init__(self, upstream: str, *, verify: ssl.SSLContext, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self._upstream = upstream.rstrip("/")
        self._verify = verify
        self._max_request_bytes = max_request_bytes
        self._client: httpx.AsyncClient | None = None
        self._open = False

    def open(self) -> None:
        """Start forwarding. Until then every Fleet call is answered 503, which Flower's SuperNode
        retries after a while (flwr/supercore/retry/http_retry.py): the SuperLink is starting, or
        the node keys are not registered yet."""
        self._open = True

    def _http(self) -> httpx.AsyncClient:
        # Made on first use, inside the serving event loop, which its connections belong to.
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=self._verify,
                timeout=httpx.Timeout(120.0, connect=10.0, pool=30.0),
                limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=64),
            )
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # uvicorn runs without websockets
            return
        path, method = scope["path"], scope["method"]
        if method != "POST" or path not in FLEET_PATHS or scope.get("query_string"):
            query = "?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else ""
            log.warning("refused %s %s from %s: not a Fleet API call of a SuperNode; this port serves only those",
                        _printable(method), _printable(path + query), _peer(scope))
            await _answer(send, 403, "fedtune server: this port serves only the Fleet API of SuperNodes")
            return
        if not self._open:
            await _answer(send, 503, "fedtune server: starting, try again shortly")
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._max_request_bytes):
            log.warning("refused %s from %s: body of %s bytes (at most %d)", path, _peer(scope),
                        _printable(declared), self._max_request_bytes)
            await _answer(send, 413, f"fedtune server: request body over {self._max_request_bytes} bytes")
            return
        forwarded = {k: v for k, v in headers.items() if k in FORWARDED_HEADERS}
        if declared is not None:
            forwarded["content-length"] = declared
        request = self._http().build_request("POST", self._upstream + path, headers=forwarded,
                                             content=self._body(receive))
        try:
            response = await self._http().send(request, stream=True)
        except _BodyTooLarge:
            log.warning("refused %s from %s: body over %d bytes", path, _peer(scope), self._max_request_bytes)
            await _answer(send, 413, f"fedtune server: request body over {self._max_request_bytes} bytes")
            return
        except _ClientGone:
            return
        except httpx.HTTPError as error:
            log.error("could not forward %s from %s to the SuperLink: %s", path, _peer(scope), error)
            await _answer(send, 502, "fedtune server: the SuperLink did not answer")
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                    for k, v in response.headers.multi_items() if k.lower() not in _HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _body(self, receive: Receive) -> AsyncIterator[bytes]:
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self._max_request_bytes:
                raise _BodyTooLarge
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def bind(host: str, port: int) -> socket.socket:
    """The public listening socket, bound now so that a port in use is an error before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As every server does (uvicorn, Flower's SuperLink): a restart may bind while connections
        # of the previous process are still in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)  # never held open by the SuperLink or any other child process
    return sock


class Gateway:
    """A FleetGateway served on `sock`, in a thread of this process, until `stop`."""

    def __init__(self, sock: socket.socket, app: FleetGateway, *, certificate: Path | None, key: Path | None) -> None:
        self._sock = sock
        config = uvicorn.Config(
            app, lifespan="on", ws="none", log_config=None, access_log=False, server_header=False,
            # h11, not httptools: it bounds what it buffers before a request's headers are complete
            # (httptools took a 16 MB header whole); the bound is per connection.
            http="h11", h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            ssl_certfile=str(certificate) if certificate else None, ssl_keyfile=str(key) if key else None,
            limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=30,
            timeout_graceful_shutdown=2,  # then in-flight requests are cut: the SuperNodes retry
        )
        config.load()  # TLS files are read here, so a bad one is an error in the caller's thread
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="fedtune-gateway", daemon=True)

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])  # uvicorn handles no signals outside the main thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the port at once, give requests in flight 2 s, then end the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()
