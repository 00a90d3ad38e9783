"""The public port of `fedtune server`: a SuperNode's Fleet calls go through, nothing else does.

Real HTTPS on loopback both sides: the gateway as `fedtune server` runs it, in front of a small
upstream that records what reaches it (the acceptance test in test_control_plane.py puts a real
SuperLink behind it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from fedtune.gateway import FLEET_PATHS, FleetGateway, Gateway, bind
from fedtune.loopback_tls import LoopbackTLS, make_loopback_tls

MAX_BODY = 1024 * 1024  # the bound, small here so that tests stay fast
BIG_REPLY = 6 * 1024 * 1024  # what the upstream sends back for pull-object: more than one read


class Upstream:
    """An HTTPS server that records every request reaching it and answers with what it received."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        record = {"method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(),
                  "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                  "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        self.seen.append(record)
        reply = bytes(range(256)) * (BIG_REPLY // 256) if scope["path"].endswith("pull-object") else b""
        content = json.dumps(record).encode() + b"\n" + reply
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"), (b"x-upstream", b"yes")]})
        for start in range(0, len(content), 65536):
            await send({"type": "http.response.body", "body": content[start:start + 65536], "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def _trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _serve_in_thread(app, sock: socket.socket, tls: LoopbackTLS) -> uvicorn.Server:  # noqa: ANN001 - ASGI app
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", ws="none", log_config=None,
                                           ssl_certfile=str(tls.certificate), ssl_keyfile=str(tls.key)))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoopbackTLS, LoopbackTLS]:
    root = tmp_path_factory.mktemp("tls")
    return make_loopback_tls(root / "upstream"), make_loopback_tls(root / "public")


@pytest.fixture
def federation(certs: tuple[LoopbackTLS, LoopbackTLS]) -> Iterator[tuple[str, Upstream, Path]]:
    """(the gateway's https address, the upstream's record, the CA a SuperNode would trust)."""
    upstream_tls, public_tls = certs
    upstream = Upstream()
    upstream_socket = bind("127.0.0.1", 0)
    upstream_server = _serve_in_thread(upstream, upstream_socket, upstream_tls)
    public = bind("127.0.0.1", 0)
    port = public.getsockname()[1]
    app = FleetGateway(f"https://127.0.0.1:{upstream_socket.getsockname()[1]}",
                       verify=ssl.create_default_context(cafile=str(upstream_tls.ca)), max_request_bytes=MAX_BODY)
    gateway = Gateway(public, app, certificate=public_tls.certificate, key=public_tls.key)
    gateway.start()
    try:
        with httpx.Client(verify=_trusting(public_tls.ca)) as client:
            # Not open yet (the SuperLink starting, keys being registered): come back later.
            early = client.post(f"https://127.0.0.1:{port}/v1/fleet/pull-messages")
            assert early.status_code == 503 and upstream.seen == []
        app.open()
        yield f"https://127.0.0.1:{port}", upstream, public_tls.ca
    finally:
        gateway.stop()
        upstream_server.should_exit = True


def test_every_fleet_call_goes_through_with_its_body_and_only_flowers_headers(federation) -> None:  # noqa: ANN001
    address, upstream, ca = federation
    body = bytes(range(256)) * 2000  # 512 KB
    headers = {"content-type": "application/protobuf", "flwr-public-key": "AAAA", "flwr-signature": "BBBB",
               "flwr-timestamp": "2026-01-01T00:00:00", "flwr-component-name": "SuperNode",
               "cookie": "session=1", "x-forwarded-for": "10.0.0.1", "flwr-task-token": "steal-a-task"}
    with httpx.Client(verify=_trusting(ca)) as client:
        for path in sorted(FLEET_PATHS):
            response = client.post(address + path, content=body, headers=headers)
            assert response.status_code == 200, path
            seen = json.loads(response.content.split(b"\n", 1)[0])
            assert seen["path"] == path and seen["size"] == len(body)
            assert seen["sha256"] == hashlib.sha256(body).hexdigest()
            assert response.headers["x-upstream"] == "yes"
        big = client.post(address + "/v1/fleet/pull-object", content=b"")
    forwarded = upstream.seen[0]["headers"]
    assert {"flwr-public-key", "flwr-signature", "flwr-timestamp", "flwr-component-name"} <= set(forwarded)
    assert not {"cookie", "x-forwarded-for", "flwr-task-token"} & set(forwarded)
    assert forwarded["host"].startswith("127.0.0.1:")  # the upstream's own address
    assert len(big.content.split(b"\n", 1)[1]) == BIG_REPLY  # streamed back whole


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/stop-run"),
    ("POST", "/v1/control/create-node-cli"),
    ("POST", "/v1/runtime/pull-messages"),
    ("GET", "/v1/fleet/pull-messages"),
    ("PUT", "/v1/fleet/push-object"),
    ("POST", "/v1/fleet/pull-messages?then=/v1/control/list-runs"),
    ("POST", "/v1/fleet/../control/list-runs"),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", "/v1/fleet/pull-messages/"),
    ("POST", "/V1/FLEET/PULL-MESSAGES"),
    ("GET", "/docs"),
    ("GET", "/health"),
])
def test_everything_else_is_refused_and_logged(federation, caplog: pytest.LogCaptureFixture, method: str,
                                               path: str) -> None:  # noqa: ANN001
    address, upstream, ca = federation
    with caplog.at_level(logging.WARNING, logger="fedtune.gateway"), httpx.Client(verify=_trusting(ca)) as client:
        response = client.request(method, address + path, content=b"\x08\x01")
    assert response.status_code == 403
    assert "serves only the Fleet API" in response.text
    assert upstream.seen == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"refused {method} ") and "from 127.0.0.1:" in line


def test_a_peer_cannot_write_lines_into_the_log(federation, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    address, _, ca = federation
    with caplog.at_level(logging.WARNING, logger="fedtune.gateway"), httpx.Client(verify=_trusting(ca)) as client:
        client.post(address + "/v1/control/x%0Aforged%20line" + "a" * 500)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and "x\\nforged line" in line and line.count("a") < 200


def test_a_body_over_the_bound_is_refused_declared_or_streamed(federation) -> None:  # noqa: ANN001
    address, upstream, ca = federation
    with httpx.Client(verify=_trusting(ca)) as client:
        declared = client.post(address + "/v1/fleet/push-object", content=b"\0" * (MAX_BODY + 1))
        assert declared.status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked, as a peer may send it
            for _ in range(MAX_BODY // 65536 + 2):
                yield b"\0" * 65536

        streamed = client.post(address + "/v1/fleet/push-object", content=chunks())
        assert streamed.status_code == 413
    assert all(r["size"] <= MAX_BODY for r in upstream.seen)  # nothing over the bound got through whole


def test_headers_over_the_bound_are_refused_before_they_are_buffered(federation) -> None:  # noqa: ANN001
    address, upstream, ca = federation
    with httpx.Client(verify=_trusting(ca)) as client:
        response = client.post(address + "/v1/fleet/pull-messages", headers={"x-padding": "a" * (1024 * 1024)})
    assert response.status_code == 400
    assert upstream.seen == []


def test_a_silent_superlink_is_a_502_not_a_hang(certs: tuple[LoopbackTLS, LoopbackTLS]) -> None:
    upstream_tls, public_tls = certs
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
    public = bind("127.0.0.1", 0)
    app = FleetGateway(f"https://127.0.0.1:{dead}", verify=ssl.create_default_context(cafile=str(upstream_tls.ca)))
    gateway = Gateway(public, app, certificate=public_tls.certificate, key=public_tls.key)
    app.open()
    gateway.start()
    try:
        with httpx.Client(verify=_trusting(public_tls.ca)) as client:
            response = client.post(f"https://127.0.0.1:{public.getsockname()[1]}/v1/fleet/pull-messages")
        assert response.status_code == 502
    finally:
        started = time.monotonic()
        gateway.stop()
    assert time.monotonic() - started < 5
