"""Local simulation: many virtual clients on this machine through Flower's Ray-backed engine."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedtune.config import ExperimentConfig
from fedtune.logs import setup_logging

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

    from server.federation import RunOutcome


def simulate(cfg: ExperimentConfig, *, client_app: ClientApp | None = None) -> RunOutcome:
    """Run `cfg` with cfg.federation.num_clients virtual clients; returns the run's outcome.

    `flwr run .` takes the experiment file from the run config; here the validated config object
    itself is handed to the ServerApp, so `--set` overrides need no round trip through TOML.
    `client_app` replaces the stock ClientApp (tests use it to inject misbehaving clients).
    """
    # Imported here: these pull in torch and the whole server, which `fedtune --help` need not.
    from client.app import app as default_client_app
    from server.federation import run_federation

    setup_logging()
    outcome: list[RunOutcome] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        outcome.append(run_federation(grid, cfg))

    # Workers inherit the environment: say where virtual nodes keep their caches, and keep each
    # worker's torch to the cores Ray gave it.
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.federation.client_cpus))
    run_simulation(
        server_app=server_app,
        client_app=client_app or default_client_app,
        num_supernodes=cfg.federation.num_clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus},
            "init_args": {"include_dashboard": False},
        },
    )
    if not outcome:
        raise RuntimeError("the simulation ended without finishing the run; see the log above")
    return outcome[0]
