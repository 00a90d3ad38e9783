"""fedtune's ServerApps: the one `flwr run .` starts, and the one `fedtune simulate` hands to Flower's simulation.

`server_app` reads the experiment file named in the run config. The Flower app's component
(server/app.py beside pyproject.toml) builds it naming the app's folder: `flwr run` ships configs/
inside the app bundle, so a relative experiment file is looked up there when it is not found in the
working directory. `simulation_server_app` is given the validated config object itself
(fedtune/simulation.py). Both run the same `run_federation` (fedtune/server/run.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from fedtune.candidates import Candidate, parse_candidates, parse_sample
from fedtune.config import ExperimentConfig, load_config
from fedtune.domain_gap import GapReport
from fedtune.logs import setup_logging
from fedtune.selection import Selection
from fedtune.server.gap import GAP_AT_HEAD, run_gap
from fedtune.server.run import (
    RunOutcome,
    node_count_mismatch,
    plays_virtual_clients,
    run_federation,
    simulation_pool,
)
from fedtune.server.selection import run_selection

log = logging.getLogger("fedtune.server")


def config_from_run_config(run_config: dict[str, object], app_root: Path) -> ExperimentConfig:
    """`config` names the experiment file (relative: to the working directory, else to `app_root`);
    `set` holds optional overrides, `;`-separated."""
    name = str(run_config.get("config", "configs/quickstart.yaml"))
    path = Path(name)
    if not path.is_absolute() and not path.is_file():
        path = app_root / name
    overrides = [item.strip() for item in str(run_config.get("set", "")).split(";") if item.strip()]
    return load_config(path, overrides)


def check_simulated_node_count(grid: Grid, cfg: ExperimentConfig, *, settle: float = 0.5) -> None:
    """In a simulation under SecAgg+ (one node per client), say at once when the node count is not
    federation.num_clients.

    Flower's simulation registers all its nodes in one loop as it starts (`simulation_pool`);
    `flwr run`'s default federation has 2 nodes. Real nodes connect one by one: run_federation
    waits for them up to federation.connect_timeout.
    """
    if not isinstance(grid, InMemoryGrid) or plays_virtual_clients(grid, cfg):
        return  # real nodes are waited for; any number of simulation nodes plays the virtual clients
    connected = len(simulation_pool(grid, cfg, settle=settle))
    if connected != cfg.federation.num_clients:
        raise RuntimeError(node_count_mismatch(connected, cfg.federation.num_clients))


def server_app(app_root: Path) -> ServerApp:
    """The ServerApp of the Flower app in the folder `app_root`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_logging()
        cfg = config_from_run_config(dict(context.run_config), app_root)
        if cfg.federation.ray_address is not None:
            # Here Flower started Ray (or there is none: real nodes) before this app ran; say so
            # rather than let the setting look obeyed.
            log.warning("federation.ray_address applies to `fedtune simulate` only and is ignored here; with "
                        "`flwr run`, set RAY_ADDRESS in the environment the local SuperLink starts from "
                        "(deploy/README.md)")
        check_simulated_node_count(grid, cfg)
        select = str(context.run_config.get("select", "")).split()
        if select:  # `fedtune server --select`: rank these candidates instead of training
            sample = parse_sample(str(context.run_config.get("select-sample", "")))
            run_selection(grid, cfg, parse_candidates(select), sample=sample)
            return
        gap = str(context.run_config.get("gap", "")).strip()
        if gap:  # `fedtune server --gap`: report the clients' domain gap instead of training
            run_gap(grid, cfg, at=None if gap == GAP_AT_HEAD else gap)
            return
        run_federation(grid, cfg)  # which sends everything through its transport (fedtune/server/transport.py)

    return app


def simulation_server_app(cfg: ExperimentConfig, outcomes: list[RunOutcome]) -> ServerApp:
    """The ServerApp of `fedtune simulate`: runs `cfg` and appends the run's outcome to `outcomes`.

    Flower's `run_simulation` calls the app and returns nothing of what it did, hence `outcomes`.
    The simulation registers the nodes fedtune/simulation.py asks for, so there is no count to check.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        outcomes.append(run_federation(grid, cfg))

    return app


def selection_server_app(cfg: ExperimentConfig, candidates: list[Candidate],
                         outcomes: list[tuple[Selection, Path]], *, sample: float = 1.0) -> ServerApp:
    """The ServerApp of `fedtune select` in a simulation: ranks `candidates` (fedtune/server/selection.py),
    each client on `sample` of its training split, and appends the selection and its folder to `outcomes`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        outcomes.append(run_selection(grid, cfg, candidates, sample=sample))

    return app


def gap_server_app(cfg: ExperimentConfig, at: str | None, outcomes: list[tuple[GapReport, Path]]) -> ServerApp:
    """The ServerApp of `fedtune gap` in a simulation: the domain-gap report (fedtune/server/gap.py)
    and its folder, appended to `outcomes`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        outcomes.append(run_gap(grid, cfg, at=at))

    return app
