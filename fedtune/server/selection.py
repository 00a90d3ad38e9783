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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid
from threadpoolctl import threadpool_limits

from fedtune.candidates import Candidate, check_sample
from fedtune.config import ExperimentConfig
from fedtune.data import ImageDataset, load_split
from fedtune.engine import resolve_device
from fedtune.report import RunDirectory
from fedtune.selection import Selection, score
from fedtune.server.delivery import ModelDelivery
from fedtune.server.run import plays_virtual_clients, simulation_pool, wait_for_nodes
from fedtune.server.statistics import (
    Collection,
    PreparedCandidate,
    collect_statistics,
    collect_statistics_securely,
    prepare_candidates,
    secure_bounds,
    warm_up,
)
from fedtune.server.transport import Transport
from fedtune.statistics_protocol import SecureBounds

log = logging.getLogger("fedtune.server")


@dataclass(frozen=True)
class StatisticsSession:
    """A federation ready to be asked for feature statistics: the candidates built, the nodes there."""

    transport: Transport
    prepared: list[PreparedCandidate]
    test_set: ImageDataset  # the server's own held-out split
    run_dir: RunDirectory
    warming: list[int] | None  # the simulation's workers to warm up (None: real nodes)
    pinged: list[str]


def open_session(grid: Grid, cfg: ExperimentConfig, candidates: list[Candidate], *, purpose: str) -> StatisticsSession:
    """Seeds, the transport, the candidates' models and the nodes, then the output folder `<name>-<purpose>`:
    everything that can fail on bad input (data, weights, a cut that is no block) fails before the folder exists."""
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
    test_set = load_split(cfg.data.source, "test", root=cfg.data.root, download=cfg.data.download, seed=cfg.seed,
                          bad_images=cfg.data.bad_images)
    configs = [(candidate, candidate.configure(cfg)) for candidate in candidates]
    run_key = f"{cfg.name}-{purpose}-{secrets.token_hex(6)}"  # scopes the data each worker keeps loaded
    prepared = prepare_candidates(configs, num_classes=len(test_set.classes), run_key=run_key,
                                  timeout=cfg.federation.round_timeout, presumed=virtual)
    wait_for_nodes(transport, cfg)
    run_dir = RunDirectory.create(cfg.output.dir, f"{cfg.name}-{purpose}")
    run_dir.write_config(cfg.to_json())
    return StatisticsSession(transport, prepared, test_set, run_dir, warming, pinged)


def warm_up_session(session: StatisticsSession) -> float:
    """In a simulation, every model into the workers' cache (as a run's warm-up before round 1); its seconds."""
    if session.warming is None:
        return 0.0
    started = time.monotonic()
    warm_up(session.transport, session.prepared, session.warming, pinged=session.pinged)
    return time.monotonic() - started


def sampled(cfg: ExperimentConfig, sample: float) -> ExperimentConfig:
    """`cfg` whose clients compute statistics on `sample` of their training split: data.train_fraction
    times `sample`, a seeded, class-stratified subset of at least one example per client
    (fedtune.data.training_subset). ValueError unless 0 < sample <= 1."""
    check_sample(sample)
    data = cfg.data.model_copy(update={"train_fraction": cfg.data.train_fraction * sample})
    return cfg.model_copy(update={"data": data})


def run_selection(grid: Grid, cfg: ExperimentConfig, candidates: list[Candidate], *, sample: float = 1.0
                  ) -> tuple[Selection, Path]:
    """Score `candidates` on the clients behind `grid`, each computing its statistics on `sample` of its
    training split; the selection and its folder."""
    cfg = sampled(cfg, sample)
    session = open_session(grid, cfg, candidates, purpose="select")
    log.info("selection: %d candidates on %d clients%s; folder %s", len(session.prepared),
             cfg.federation.num_clients, f", each on {sample:.0%} of its training split" if sample < 1 else "",
             session.run_dir.path)
    warm_up_seconds = warm_up_session(session)  # not counted in the selection's seconds, as a run's round 1
    started = time.monotonic()
    with server_blas_threads(grid):
        selection = _select(session.transport, cfg, session.prepared, session.test_set)
    selection = replace(selection, seconds=time.monotonic() - started, warm_up_seconds=warm_up_seconds,
                        sample=sample)
    selection.write(session.run_dir.path)
    log.info("selection: %s; results: %s", selection.summary(), session.run_dir.path)
    return selection, session.run_dir.path


def server_blas_threads(grid: Grid) -> AbstractContextManager[object]:
    """In a simulation the server shares the machine's cores with the clients' workers: its linear
    algebra (a Gram matrix's eigendecomposition per candidate, for LogME) runs on one thread. With
    OpenBLAS's threads contending with the workers', one 1280 x 1280 eigendecomposition took 5.2 s
    instead of 0.6 s on 2 busy cores here."""
    return threadpool_limits(limits=1, user_api="blas") if isinstance(grid, InMemoryGrid) else nullcontext()


def _select(transport: Transport, cfg: ExperimentConfig, prepared: list[PreparedCandidate],
            test_set: ImageDataset) -> Selection:
    """The statistics (securely summed under SecAgg+), scored."""
    clients = transport.get_node_ids()
    secure = cfg.privacy.secure_aggregation
    report: dict[str, Any] = {}
    if secure.enabled:
        # Public bounds from the server's own data, then one secure sum of every client's statistics.
        bounds = secure_bounds(prepared, test_set, clients=clients, max_examples=int(secure.max_weight),
                               device=resolve_device(cfg.train.device))
        collection = collect_statistics_securely(transport, prepared, clients=clients, secure=secure, bounds=bounds,
                                                 timeout=cfg.federation.round_timeout,
                                                 name_of=prepared[0].delivery.name_of)
        report = _secure_report(prepared, bounds, collection, clients=len(collection.used))
    else:
        collection = collect_statistics(transport, prepared, clients=clients, timeout=cfg.federation.round_timeout,
                                        name_of=prepared[0].delivery.name_of)
    sums = collection.sums()
    scoring = time.monotonic()
    scores = [score(candidate.candidate, stats, feature_dim=candidate.feature_dim, seconds=cost.seconds,
                    bytes_sent=cost.bytes_sent, bytes_received=cost.bytes_received,
                    client_seconds=cost.client_seconds)
              for candidate, stats, cost in zip(prepared, sums, collection.cost_by_candidate, strict=True)]
    return Selection(
        name=cfg.name, scores=scores, clients=len(clients), clients_used=collection.used,
        clients_refused=collection.refused, clients_failed=collection.failed,
        seconds=0.0, bytes_sent=collection.cost.bytes_sent, bytes_received=collection.cost.bytes_received,
        secure_aggregation=secure.enabled, secure=report, scoring_seconds=time.monotonic() - scoring,
    )


def _secure_report(candidates: list[PreparedCandidate], bounds: SecureBounds, collection: Collection, *,
                   clients: int) -> dict[str, Any]:
    """What SecAgg+ did to the sums: the public bounds, the features clipped, and how far quantisation can
    move an entry (each client's scaled value travels as two digits, the second rounded stochastically
    to a step of 2 / levels of a step of 2 / levels: the sum's error has mean zero and is at most
    clients x 4 / levels^2, in units of the bound)."""
    levels = bounds.levels
    step = 4 / levels**2
    return {
        "quantization_levels": levels,
        "max_examples_per_client": bounds.max_examples,
        "candidates": {
            candidate.label: {
                "feature_norm_bound": norm,
                "features_clipped": clipped,
                "largest_error_gram_entry": clients * step * bounds.max_examples * norm**2,
                "largest_error_class_sum": clients * step * bounds.max_examples * norm,
            }
            for candidate, norm, clipped in zip(candidates, bounds.norms, collection.clipped, strict=True)
        },
    }
