"""`fedtune select` on the server: rank candidate backbones on the federation's data before any training.

Every client computes the statistics of each candidate's frozen features on its training split
(fedtune/server/statistics.py collects them); the server scores their sums (fedtune/selection.py)
and writes the selection's folder under output.dir: selection.json, selection.csv, selection.png
and the resolved config. The same function runs in a simulation and on real nodes.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp import Grid

from fedtune.candidates import Candidate
from fedtune.config import ExperimentConfig
from fedtune.data import load_split
from fedtune.report import RunDirectory
from fedtune.selection import Selection, score
from fedtune.server.delivery import ModelDelivery
from fedtune.server.run import plays_virtual_clients, simulation_pool, wait_for_nodes
from fedtune.server.statistics import collect_statistics, prepare_candidates
from fedtune.server.transport import Transport

log = logging.getLogger("fedtune.server")


def run_selection(grid: Grid, cfg: ExperimentConfig, candidates: list[Candidate]) -> tuple[Selection, Path]:
    """Score `candidates` on the clients behind `grid`; the selection and its folder."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    virtual = plays_virtual_clients(grid, cfg)
    transport = Transport(grid, virtual_clients=cfg.federation.num_clients if virtual else None)
    warming: list[int] | None = None
    pinged: list[str] = []
    if virtual:  # the workers import torch and fedtune while the server builds the candidates
        warming = list(range(min(len(simulation_pool(grid, cfg)), cfg.federation.num_clients)))
        pinged = ModelDelivery.ping(transport, warming)
    # Everything that can fail on bad input (data, weights, a cut that is no block) fails before the folder exists.
    classes = load_split(cfg.data.source, "test", root=cfg.data.root, download=cfg.data.download, seed=cfg.seed,
                         bad_images=cfg.data.bad_images).classes
    configs = [(candidate, candidate.configure(cfg)) for candidate in candidates]
    run_key = f"{cfg.name}-select-{secrets.token_hex(6)}"  # scopes the data each worker keeps loaded
    prepared = prepare_candidates(configs, num_classes=len(classes), run_key=run_key,
                                  timeout=cfg.federation.round_timeout, presumed=virtual)
    wait_for_nodes(transport, cfg)
    run_dir = RunDirectory.create(cfg.output.dir, f"{cfg.name}-select")
    run_dir.write_config(cfg.to_json())
    log.info("selection: %d candidates on %d clients; folder %s", len(prepared), cfg.federation.num_clients,
             run_dir.path)

    started = time.monotonic()
    clients = transport.get_node_ids()
    collection = collect_statistics(transport, prepared, clients=clients, timeout=cfg.federation.round_timeout,
                                    warming=warming, pinged=pinged, name_of=prepared[0].delivery.name_of)
    sums = collection.sums()
    scores = [score(candidate.candidate, stats, feature_dim=candidate.feature_dim, seconds=cost.seconds,
                    bytes_sent=cost.bytes_sent, bytes_received=cost.bytes_received)
              for candidate, stats, cost in zip(prepared, sums, collection.cost_by_candidate, strict=True)]
    selection = Selection(
        name=cfg.name, scores=scores, clients=len(clients), clients_used=sorted(collection.per_client),
        clients_refused=collection.refused, clients_failed=collection.failed,
        seconds=time.monotonic() - started, bytes_sent=collection.cost.bytes_sent,
        bytes_received=collection.cost.bytes_received,
    )
    selection.write(run_dir.path)
    log.info("selection: %s; results: %s", selection.summary(), run_dir.path)
    return selection, run_dir.path
