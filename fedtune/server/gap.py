"""`fedtune gap` on the server: how far each client's data lies from the rest, before anyone blames the algorithm.

Every client computes the statistics of its training split's frozen features (the config's own
backbone, or the block `at` names) against its labels, as for `fedtune select`
(fedtune/server/statistics.py); the server computes the same on its held-out split, the reference,
and fedtune/domain_gap.py turns them into per-client feature distances, label skew and flags.
Writes gap.json and gap.png to a folder under output.dir. The same function runs in a simulation
and on real nodes.

Under SecAgg+ it refuses to run: the report is per client, which is exactly what secure
aggregation keeps from the server.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.serverapp import Grid

from fedtune.candidates import Candidate
from fedtune.config import ExperimentConfig
from fedtune.domain_gap import GapReport, domain_gap
from fedtune.domain_gap_view import write_gap_report
from fedtune.engine import resolve_device
from fedtune.server.selection import open_session, server_blas_threads, warm_up_session
from fedtune.server.statistics import collect_statistics, reference_statistics

log = logging.getLogger("fedtune.server")

# `fedtune server --gap head`: compare the features the head reads (any other value names a block).
GAP_AT_HEAD = "head"


def gap_candidate(cfg: ExperimentConfig, at: str | None) -> Candidate:
    """The config's own model, or the same backbone ending after block `at` (earlier blocks see colour,
    blur and texture, which the pooled top features largely ignore)."""
    return Candidate(backbone=cfg.model.backbone, weights=cfg.model.weights, cut=at or cfg.model.cut)


def run_gap(grid: Grid, cfg: ExperimentConfig, *, at: str | None = None) -> tuple[GapReport, Path]:
    """The domain-gap report of the clients behind `grid`, and the folder it was written to."""
    if cfg.privacy.secure_aggregation.enabled:
        raise ValueError("fedtune gap reports each client's statistics, which privacy.secure_aggregation keeps from "
                         "the server: run it without secure aggregation, or not at all")
    session = open_session(grid, cfg, [gap_candidate(cfg, at)], purpose="gap")
    (candidate,) = session.prepared
    log.info("domain gap: %s features of %d clients; folder %s", candidate.label, cfg.federation.num_clients,
             session.run_dir.path)
    warm_up_session(session)
    name_of = candidate.delivery.name_of
    collection = collect_statistics(session.transport, session.prepared, clients=session.transport.get_node_ids(),
                                    timeout=cfg.federation.round_timeout, name_of=name_of)
    if len(collection.per_client) < 2:
        raise RuntimeError(f"fedtune gap needs the statistics of at least 2 clients; {len(collection.per_client)} "
                           "sent usable ones (see the log above)")
    clients = {name_of(client): collection.per_client[client].statistics[0] for client in sorted(collection.per_client)}
    with server_blas_threads(grid):
        reference = reference_statistics(candidate, session.test_set, device=resolve_device(cfg.train.device))
        report = domain_gap(clients, class_names=session.test_set.classes, reference=reference)
    write_gap_report(report, session.run_dir.path)
    log.info("domain gap: %d of %d clients flagged for label skew, %d for feature shift; results: %s",
             len(report.flagged("label_skew")), len(clients), len(report.flagged("feature_shift")),
             session.run_dir.path)
    return report, session.run_dir.path
