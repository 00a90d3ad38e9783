"""Simulation: many virtual clients through Flower's Ray-backed engine, on this machine or an existing Ray cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.simulation import run_simulation

from fedtune import lifeline
from fedtune.config import ExperimentConfig
from fedtune.logs import Verbosity, setup_logging, verbosity

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fedtune.candidates import Candidate
    from fedtune.domain_gap import GapReport
    from fedtune.selection import Selection
    from fedtune.server.run import RunOutcome

log = logging.getLogger("fedtune.simulation")


def simulation_nodes(cfg: ExperimentConfig) -> int:
    """How many nodes Flower's simulation starts: as many as clients take part in one exchange, to
    play the federation's virtual clients (fedtune/server/transport.py, VirtualClients), or one per
    client where the config needs that (`ExperimentConfig.one_node_per_client`)."""
    federation = cfg.federation
    if cfg.one_node_per_client:
        return federation.num_clients
    exchange = federation.sampled_per_round
    if cfg.federated_evaluation:
        exchange = max(exchange, federation.evaluated_per_round)
    return min(exchange, federation.num_clients)


def simulate(cfg: ExperimentConfig, *, client_app: ClientApp | None = None) -> RunOutcome:
    """Run `cfg` with cfg.federation.num_clients virtual clients; returns the run's outcome.

    The clients are played by a pool of simulation nodes, as many as take part in one exchange
    (`simulation_nodes`): a round costs what its sampled clients do, however many clients exist.

    `flwr run .` takes the experiment file from the run config; here the validated config object
    itself is handed to the ServerApp, so `--set` overrides need no round trip through TOML.
    `client_app` replaces the stock ClientApp (tests use it to inject misbehaving clients).
    With cfg.federation.ray_address set, the virtual clients run on that Ray cluster's workers;
    this process drives the run and writes its results.
    """
    # Imported here: these pull in torch and the whole server, which `fedtune --help` need not.
    from fedtune.server.app import simulation_server_app

    outcomes: list[RunOutcome] = []
    _simulate(cfg, simulation_server_app(cfg, outcomes), client_app=client_app)
    if not outcomes:
        raise RuntimeError("the simulation ended without finishing the run; see the log above")
    return outcomes[0]


def select(cfg: ExperimentConfig, candidates: list[Candidate], *, sample: float = 1.0,
           client_app: ClientApp | None = None) -> tuple[Selection, Path]:
    """`fedtune select` on virtual clients: the candidates ranked on their data, each client's statistics
    from `sample` of its training split (fedtune/server/selection.py), and the folder the selection was
    written to. Nodes and Ray as for `simulate`."""
    from fedtune.server.app import selection_server_app

    outcomes: list[tuple[Selection, Path]] = []
    _simulate(cfg, selection_server_app(cfg, candidates, outcomes, sample=sample), client_app=client_app)
    if not outcomes:
        raise RuntimeError("the simulation ended without finishing the selection; see the log above")
    return outcomes[0]


def gap(cfg: ExperimentConfig, *, at: str | None = None, client_app: ClientApp | None = None
        ) -> tuple[GapReport, Path]:
    """`fedtune gap` on virtual clients: the domain-gap report of their data (fedtune/server/gap.py), and
    the folder it was written to. Nodes and Ray as for `simulate`."""
    from fedtune.server.app import gap_server_app

    outcomes: list[tuple[GapReport, Path]] = []
    _simulate(cfg, gap_server_app(cfg, at, outcomes), client_app=client_app)
    if not outcomes:
        raise RuntimeError("the simulation ended without finishing the domain-gap report; see the log above")
    return outcomes[0]


def _simulate(cfg: ExperimentConfig, server_app: ServerApp, *, client_app: ClientApp | None) -> None:
    """Run `server_app` against cfg's virtual clients (`simulation_nodes`) on Ray, local or cfg's cluster."""
    from fedtune.client.app import app as default_client_app

    setup_logging()
    # Ray's processes (GCS, raylet, agents, workers) run in sessions of their own: without this,
    # some outlive a `kill -9` of this process.
    lifeline.hold()

    # Workers of a local Ray inherit the environment: say where virtual nodes keep their caches,
    # and keep each worker's torch to the cores Ray gave it. Workers of an existing cluster get
    # the environment of `ray start` on their own machine instead (deploy/README.md).
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.federation.client_cpus))
    address = cfg.federation.ray_address
    if address is not None:
        log.info("attaching to the Ray cluster at %s", address)
    run_simulation(
        server_app=server_app,
        client_app=client_app or default_client_app,
        num_supernodes=simulation_nodes(cfg),
        backend_config={
            "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus},
            # Flower's Ray backend hands init_args to ray.init (unless Ray is already initialised in
            # this process). Without an address Ray would attach to a cluster named by RAY_ADDRESS
            # or last started by `ray start` on this machine; "local" keeps an unset
            # federation.ray_address meaning a Ray of this run's own.
            # Ray's own INFO lines only under `fedtune -v`.
            "init_args": {"include_dashboard": False, "address": address or "local",
                          "logging_level": logging.INFO if verbosity() is Verbosity.VERBOSE else logging.WARNING},
        },
    )
