"""What the Fleet gateway of `fedtune server` adds to a SuperNode's requests: latency and throughput.

    python benchmarks/gateway_cost.py                       # about 1 minute
    python benchmarks/gateway_cost.py --requests 400 --out benchmarks/results/gateway-cost

On loopback, each in a process of its own: an HTTPS server standing in for the SuperLink (it
answers every Fleet call at once, with a body of the size asked for), and fedtune's gateway
(fedtune/gateway.py, as `fedtune server` runs it: TLS on the public side, TLS to the upstream).
This process sends the same requests to the upstream directly and through the gateway, one at a
time on one kept-alive connection, as a SuperNode does:

- a small call (200 B each way, what pull-messages, heartbeats and confirmations are);
- a 5 MB upload (one object chunk of a reply, push-object) and a 5 MB download (one chunk of the
  backbone or the global model, pull-object).

It prints medians and 90th percentiles, and what they add up to for one round of the quickstart
(see --calls-per-round) on top of the round's own time.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tables import write_results  # benchmarks/tables.py, beside this script

from fedtune.console import compare_table
from fedtune.gateway import FleetGateway, Gateway, bind
from fedtune.loopback_tls import make_loopback_tls

CHUNK = 5 * 1024 * 1024  # Flower's array chunk (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
SMALL = 200


async def _upstream_app(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
    """Reads the whole request, answers with as many bytes as its first 8 bytes ask for (the gateway
    passes on no header of its own, so the size travels in the body)."""
    if scope["type"] != "http":
        return
    head, more = b"", True
    while more:
        message = await receive()
        head, more = head or message.get("body", b"")[:8], message.get("more_body", False)
    size = int.from_bytes(head[:8], "big")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/protobuf"), (b"content-length", str(size).encode())]})
    await send({"type": "http.response.body", "body": b"\0" * size})


def _serve(role: str, tls_dir: Path, upstream_port: int | None, port_file: Path) -> None:
    """Run the upstream or the gateway in this process until SIGTERM; writes its port to `port_file`."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    port_file.write_text(str(sock.getsockname()[1]))
    upstream_tls, public_tls = tls_dir / "upstream", tls_dir / "public"
    if role == "upstream":
        config = uvicorn.Config(_upstream_app, lifespan="off", ws="none", log_config=None, access_log=False,
                                ssl_certfile=str(upstream_tls / "server.crt"),
                                ssl_keyfile=str(upstream_tls / "server.key"))
        uvicorn.Server(config).run(sockets=[sock])
        return
    verify = ssl.create_default_context(cafile=str(upstream_tls / "ca.crt"))
    app = FleetGateway(f"https://127.0.0.1:{upstream_port}", verify=verify)
    app.open()
    gateway = Gateway(sock, app, certificate=public_tls / "server.crt", key=public_tls / "server.key")
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])  # for sigwait, in every thread
    gateway.start()
    signal.sigwait([signal.SIGTERM, signal.SIGINT])  # the main thread idles, as in `fedtune server`
    gateway.stop()


def _start(role: str, tls_dir: Path, upstream_port: int | None = None) -> tuple[subprocess.Popen, int]:
    port_file = tls_dir / f"{role}.port"
    command = [sys.executable, __file__, "--role", role, "--tls-dir", str(tls_dir)]
    if upstream_port is not None:
        command += ["--upstream-port", str(upstream_port)]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"the {role} did not start")
        time.sleep(0.05)
    return process, int(port_file.read_text())


def _time(client: httpx.Client, url: str, *, up: int, down: int, repeat: int) -> list[float]:
    body = down.to_bytes(8, "big") + b"\0" * (up - 8)
    for _ in range(3):  # warm the connection and TLS session
        client.post(url, content=body)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.post(url, content=body)
        assert response.status_code == 200 and len(response.content) == down, response.status_code
        times.append(time.perf_counter() - started)
    return times


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="Small calls per path (5 MB ones: a tenth).")
    parser.add_argument("--calls-per-round", type=int, default=60,
                        help="Fleet calls one node makes in a round (polls, pulls, pushes, confirmations).")
    parser.add_argument("--out", type=Path, default=None, help="Write table.md and table.json here.")
    parser.add_argument("--role", choices=["upstream", "gateway"], help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        _serve(args.role, args.tls_dir, args.upstream_port, args.tls_dir / f"{args.role}.port")
        return

    with tempfile.TemporaryDirectory() as tmp:
        tls_dir = Path(tmp)
        upstream_tls, public_tls = make_loopback_tls(tls_dir / "upstream"), make_loopback_tls(tls_dir / "public")
        upstream, upstream_port = _start("upstream", tls_dir)
        gateway, gateway_port = _start("gateway", tls_dir, upstream_port)
        rows = []
        try:
            targets = {"direct": (upstream_port, upstream_tls.ca), "through the gateway": (gateway_port, public_tls.ca)}
            results: dict[str, dict[str, list[float]]] = {}
            for name, (port, ca) in targets.items():
                with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=60) as client:
                    base = f"https://127.0.0.1:{port}/v1/fleet"
                    results[name] = {
                        "small": _time(client, f"{base}/pull-messages", up=SMALL, down=SMALL, repeat=args.requests),
                        "5 MB up": _time(client, f"{base}/push-object", up=CHUNK, down=SMALL,
                                         repeat=max(10, args.requests // 10)),
                        "5 MB down": _time(client, f"{base}/pull-object", up=SMALL, down=CHUNK,
                                           repeat=max(10, args.requests // 10)),
                    }
            for name, timings in results.items():
                rows.append({
                    "path": name,
                    "small call, median (ms)": round(1000 * statistics.median(timings["small"]), 2),
                    "small call, p90 (ms)": round(1000 * _p90(timings["small"]), 2),
                    "5 MB up (MB/s)": round(CHUNK / 1e6 / statistics.median(timings["5 MB up"]), 1),
                    "5 MB down (MB/s)": round(CHUNK / 1e6 / statistics.median(timings["5 MB down"]), 1),
                })
        finally:
            for process in (gateway, upstream):
                process.terminate()
                process.wait(timeout=30)
    added = rows[1]["small call, median (ms)"] - rows[0]["small call, median (ms)"]
    note = (f"Added per small call: {added:.2f} ms (median); for {args.calls_per_round} calls a node makes in a "
            f"round: {added * args.calls_per_round / 1000:.2f} s per round, spread over its calls. "
            f"{os.cpu_count()} CPU cores, 1-min load average {os.getloadavg()[0]:.1f} at the end.")
    if args.out is not None:
        table = write_results(args.out, rows, note)
    else:
        table = compare_table(rows, list(rows[0]))
    print(f"{table}\n\n{note}")


if __name__ == "__main__":
    main()
