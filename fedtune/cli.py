"""The `fedtune` command: simulate a federation, check a config, classify with a saved model."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from fedtune.atomic import write_text_atomically
from fedtune.logs import Verbosity, setup_logging

if TYPE_CHECKING:
    from fedtune.candidates import Candidate
    from fedtune.config import ExperimentConfig

# Every fedtune import that pulls in torch, Flower or the server sits inside the command that needs
# it: `fedtune --help` then answers without loading them (benchmarks/cli_startup.py).
cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated fine-tuning of pretrained backbones on Flower.")

ConfigArg = Annotated[Path, typer.Argument(help="Experiment file (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a setting, e.g. --set train.lr=0.01 (repeatable).", show_default=False),
]
SampleOpt = Annotated[
    float,
    typer.Option("--sample", help="Compute each client's statistics on this share of its training split (a seeded, "
                                  "class-stratified subset, at least one example): cheaper, noisier scores. "
                                  "The README measures the ranking against fine-tuning at 1.0 and below."),
]


class BadImagesChoice(enum.StrEnum):
    error = "error"
    skip = "skip"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@cli.callback()
def _console(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also print debug lines, and Flower's and Ray's routine ones.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the result.")] = False,
) -> None:
    if verbose and quiet:
        _fail("--verbose and --quiet cannot be given together")
    setup_logging(Verbosity.VERBOSE if verbose else Verbosity.QUIET if quiet else Verbosity.NORMAL)


def _load(config: Path, overrides: list[str] | None) -> ExperimentConfig:
    from fedtune.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as error:
        _fail(str(error))
        raise  # unreachable: _fail exits


def _prepare(config: Path, overrides: list[str] | None, *, simulation: bool) -> ExperimentConfig:
    """The validated experiment, after the checks that need its files, data and model (fedtune/server/preflight.py)."""
    cfg = _load(config, overrides)
    from fedtune.server.preflight import PreflightError, preflight

    try:
        preflight(cfg, simulation=simulation)
    except PreflightError as error:
        _fail(f"{config}: {error}")
    return cfg


@cli.command()
def check(config: ConfigArg, set_: SetOpt = None) -> None:
    """Validate an experiment file and print the resolved settings.

    Beyond the file itself, checks what `fedtune simulate` would need: the data under data.root
    (every test image decoded), the model and its weights file, trainable_blocks and
    lr_multipliers against the backbone, output.dir, and the checkpoint a run would resume from.
    """
    cfg = _prepare(config, set_, simulation=True)
    typer.echo(cfg.to_json())


def _comparison_row(label: str, outcome: object, history_file: Path) -> dict[str, object]:
    from fedtune.report import RunDirectory

    rounds = [r for r in RunDirectory.load_history(history_file) if r.round > 0]
    return {
        "run": label,
        "final accuracy": outcome.final_central_accuracy,  # type: ignore[attr-defined]
        "best accuracy": max((r.central_accuracy or 0.0) for r in rounds),
        "bytes per round (after the first)": (
            sum(r.bytes_sent + r.bytes_received for r in rounds[1:]) / max(1, len(rounds) - 1)
        ),
        "bytes in the first round": rounds[0].bytes_sent + rounds[0].bytes_received,
        "seconds": sum(r.seconds for r in rounds),
        "results": str(outcome.run_dir),  # type: ignore[attr-defined]
    }


@cli.command()
def simulate(
    config: ConfigArg,
    set_: SetOpt = None,
    compare_scratch: Annotated[
        bool, typer.Option("--compare-scratch", help="Also run the same budget from random weights and compare.")
    ] = False,
) -> None:
    """Run a federation of virtual clients on this machine (Flower simulation engine, Ray)."""
    cfg = _prepare(config, set_, simulation=True)
    scratch_cfg = None
    if compare_scratch and cfg.model.weights != "none":
        scratch_cfg = _prepare(config, [*(set_ or []), "model.weights=none", f"name={cfg.name}-scratch"],
                               simulation=True)
    from fedtune.simulation import simulate as run

    try:
        outcome = run(cfg)
        rows = [_comparison_row(f"{cfg.model.weights} weights", outcome, outcome.run_dir / "history.json")]
        if scratch_cfg is not None:
            scratch = run(scratch_cfg)
            rows.append(_comparison_row("random init (scratch)", scratch, scratch.run_dir / "history.json"))
    except (FileNotFoundError, ValueError, RuntimeError, ConnectionError) as error:
        # Bad data paths, weights files or a run that cannot go on: one line, not a traceback.
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None
    from fedtune.console import compare_table

    typer.echo("")
    typer.echo(compare_table(rows, list(rows[0])))
    if len(rows) > 1:
        write_text_atomically(outcome.run_dir / "comparison.json", json.dumps(rows, indent=2))
    # No closing "results:" line: the table's last column and the run's log line name each run's folder.


def _candidates(values: list[str], cfg: ExperimentConfig, *, option: str = "--candidates") -> list[Candidate]:
    """The candidates asked for, each checked against the experiment before anything starts (a cut that is
    no block, a missing weights file, training settings its model cannot follow)."""
    from fedtune.candidates import parse_candidates
    from fedtune.config import ConfigError
    from fedtune.server.preflight import PreflightError, preflight_model

    try:
        # `--candidates a b c` reaches typer as one option then arguments it does not expect; the
        # option is repeatable, and each value may hold several candidates separated by spaces.
        parsed = parse_candidates([item for value in values for item in value.split()])
    except ValueError as error:
        _fail(f"{option}: {error}")
        raise  # unreachable: _fail exits
    for candidate in parsed:
        if "'" in candidate.label:  # it travels in a quoted TOML string of the run config on real nodes
            _fail(f"{option}: {candidate.label}: a quote (') in a candidate is not supported")
        try:
            preflight_model(candidate.configure(cfg))
        except (ConfigError, PreflightError) as error:
            _fail(f"{option}: {candidate.label}: {error}")
    return parsed


@cli.command()
def select(
    config: ConfigArg,
    set_: SetOpt = None,
    candidates: Annotated[
        list[str] | None,
        typer.Option("--candidates", help="Backbones to rank, each BACKBONE, BACKBONE@CUT, BACKBONE:WEIGHTS or "
                                          "BACKBONE@CUT:WEIGHTS: efficientnet_lite0 "
                                          "(ImageNet weights), efficientnet_lite0:none (random init), "
                                          "efficientnet_lite0@blocks_5 (cut after blocks_5), resnet18:FILE (a "
                                          "weights file). Give several after one --candidates, or repeat it. 'all': "
                                          "every registered backbone with ImageNet weights (a connected machine). "
                                          "Default: the three Lite backbones, Lite0 from random init and Lite0 cut "
                                          "after blocks_5.", show_default=False),
    ] = None,
    write: Annotated[
        Path | None, typer.Option("--write", help="Write CONFIG with the chosen backbone (model.backbone, weights, "
                                                  "cut) to this file: a ready experiment.", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Let --write replace an existing file.")] = False,
    sample: SampleOpt = 1.0,
) -> None:
    """Rank candidate backbones on the federation's data before any training (LogME, H-score).

    Each client computes, for each candidate, sums of its frozen features of its training split
    against its labels (the Gram matrix F^T F, each class's feature sum and count) and sends only
    those; the server adds them up and scores the whole federation: LogME ranks (You et al. 2021),
    the H-score and its shrunk form stand beside it. The sums are not the features, but from a client
    with few examples they reveal much of them (the Gram matrix determines its features up to a
    rotation when it has no more examples than dimensions). With privacy.secure_aggregation the server
    sees only the federation's sums. Writes selection.json, selection.csv and selection.png to a
    folder under output.dir, prints the ranking and the seconds and bytes spent. The chosen
    candidate's features stay in the clients' caches for the run that follows (not with --sample
    below 1: the run reads the whole split). --sample trades the scores' precision for time: the
    README measures the ranking against fine-tuning at each share.
    """
    from fedtune.candidates import DEFAULT_CANDIDATES
    from fedtune.config import ConfigError

    cfg = _prepare(config, set_, simulation=True)
    ranked = _candidates(candidates or list(DEFAULT_CANDIDATES), cfg)
    _check_sample(sample)
    if write is not None and write.exists() and not force:
        _fail(f"--write: {write} exists; pass --force to replace it")
    from fedtune.selection import chosen_config_text, print_table, write_chosen_config
    from fedtune.simulation import select as run

    try:
        selection, folder = run(cfg, ranked, sample=sample)
    except (FileNotFoundError, ValueError, RuntimeError, ConnectionError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None
    print_table(selection)
    typer.echo(f"results: {folder}")
    if write is not None:
        chosen = next(c for c in ranked if c.label == selection.chosen.candidate)
        try:
            note = f" (centred LogME {selection.chosen.logme_centred:.4f}, {folder / 'selection.json'})"
            text = chosen_config_text(config, set_ or [], chosen, note=note)
            write_chosen_config(write, text, force=force)
        except FileExistsError:
            _fail(f"--write: {write} exists; pass --force to replace it")
        except (ConfigError, OSError) as error:
            _fail(f"--write: {error}")
        typer.echo(f"config: {write} (model {chosen.label})")


def _check_sample(sample: float) -> None:
    from fedtune.candidates import check_sample

    try:
        check_sample(sample)
    except ValueError as error:
        _fail(f"--sample: {error}")


def _check_gap(cfg: ExperimentConfig, at: str | None, *, option: str) -> None:
    """Exit naming the problem if a domain-gap report of `cfg` (at block `at`) cannot run."""
    from fedtune.server.gap import gap_candidate

    if cfg.privacy.secure_aggregation.enabled:
        _fail("fedtune gap reports each client's statistics, which privacy.secure_aggregation keeps from the "
              "server: run it without secure aggregation")
    if at is not None:
        _candidates([gap_candidate(cfg, at).label], cfg, option=option)


@cli.command()
def gap(
    config: ConfigArg,
    set_: SetOpt = None,
    at: Annotated[
        str | None,
        typer.Option("--at", help="A block of the backbone (see `fedtune backbones`) whose average-pooled output is "
                                  "compared, e.g. blocks_3: earlier blocks see colour, blur and texture, which the "
                                  "features the head reads largely ignore. Default: those features.",
                     show_default=False),
    ] = None,
) -> None:
    """Report how far each client's data lies from the rest: feature distances, label skew, flags.

    Each client sends the statistics of its training split's frozen features (Gram matrix, class sums and
    counts, as for `fedtune select`); the server compares each client with the rest of the federation and
    with its own held-out split: Fréchet distance, CORAL, MMD (linear kernel), a class-conditional feature
    shift (which separates changed images from label skew, and flags outliers), and the Hellinger and
    Jensen-Shannon distances of each label distribution from the federation's (flagged at 0.3 Hellinger).
    Writes gap.json and gap.png to a folder under output.dir. Refused under privacy.secure_aggregation: the
    report is per client.
    """
    cfg = _prepare(config, set_, simulation=True)
    _check_gap(cfg, at, option="--at")
    from fedtune.domain_gap_view import print_gap_report
    from fedtune.simulation import gap as run

    try:
        report, folder = run(cfg, at=at)
    except (FileNotFoundError, ValueError, RuntimeError, ConnectionError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None
    print_gap_report(report)
    typer.echo(f"results: {folder}")


@cli.command()
def predict(
    model: Annotated[Path, typer.Argument(help="A run directory, or its model.safetensors.", show_default=False)],
    images: Annotated[
        Path | None,
        typer.Option(help="Folder of images (class subfolders give labels); default: the run's test split."),
    ] = None,
    show: Annotated[int, typer.Option(help="How many predictions to print.")] = 10,
    bad_images: Annotated[
        BadImagesChoice | None,
        typer.Option(help="An image that cannot be decoded safely (corrupt, truncated, too large): stop with an "
                          "error, or skip it with a warning. Default: error, or the run's data.bad_images for its "
                          "test split.", show_default=False),
    ] = None,
) -> None:
    """Classify images with a saved model; prints accuracy where labels are known."""
    from fedtune.predict import accuracy, load_saved, predict_folder, predict_test_split

    policy: Literal["error", "skip"] | None = None
    if bad_images is not None:
        policy = "skip" if bad_images is BadImagesChoice.skip else "error"
    try:
        run = load_saved(model)
        if images:
            predictions = predict_folder(run, images, bad_images=policy or "error")
        else:
            predictions = predict_test_split(run, bad_images=policy)
    except (FileNotFoundError, ValueError) as error:  # ConfigError and BadImageError are ValueErrors
        _fail(str(error))
        return
    for p in predictions[:show]:
        truth = f"  (label: {p.label})" if p.label is not None else ""
        typer.echo(f"{p.item}: {p.predicted} {p.confidence:.2f}{truth}")
    if len(predictions) > show:
        typer.echo(f"... {len(predictions) - show} more")
    acc = accuracy(predictions)
    if acc is not None:
        labelled = sum(p.label is not None for p in predictions)
        typer.echo(f"accuracy: {acc:.4f} on {labelled} labelled images")


@cli.command()
def backbones(
    num_classes: Annotated[int, typer.Option(help="Classes of the new head, for the sizes shown.")] = 10,
) -> None:
    """List the backbones, their blocks (bottom to top) and what travels per trainable_blocks."""
    from fedtune.backbones import BACKBONES, build_model
    from fedtune.console import format_bytes
    from fedtune.params import num_bytes, trainable_stages, trainable_state_dict

    for name in sorted(BACKBONES):
        model = build_model(name, num_classes=num_classes, weights="none")
        full = format_bytes(num_bytes(model.state_dict()))
        sizes = ", ".join(
            f"{k}: {format_bytes(num_bytes(trainable_state_dict(model, trainable_stages(model, k))))}"
            for k in (0, 1, 2)
        )
        typer.echo(f"{name}  (full model {full}; per message with trainable_blocks {sizes})")
        typer.echo(f"    blocks: {', '.join(model.block_names)}")


@cli.command()
def server(
    config: ConfigArg,
    set_: SetOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for clients on other machines.")] = "0.0.0.0",
    port: Annotated[
        int, typer.Option(help="Port clients connect to. It serves only what a SuperNode needs (Flower's Fleet API); "
                               "runs are submitted, listed and stopped by this command alone.")
    ] = 9092,
    certs: Annotated[
        Path | None, typer.Option(help="Folder with server.crt and server.key (deploy/make-certs.sh; its ca.crt "
                                       "goes to the clients).")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (only for trusted networks).")] = False,
    state_dir: Annotated[
        Path, typer.Option(help="The flwr CLI's connection to the SuperLink, that SuperLink's loopback TLS files "
                                "(new at each start) and the registered node keys.")
    ] = Path(".fedtune-server"),
    authorized_keys: Annotated[
        Path | None,
        typer.Option(help="Only SuperNodes with these public keys may join: a file, one key per line, or a folder "
                          "of *.pub files (fedtune keygen)."),
    ] = None,
    select: Annotated[
        list[str] | None,
        typer.Option("--select", help="Instead of training, rank these candidate backbones on the connected "
                                      "clients, as `fedtune select --candidates` does in a simulation "
                                      "(BACKBONE, BACKBONE@CUT, BACKBONE:WEIGHTS or BACKBONE@CUT:WEIGHTS, "
                                      "several separated by spaces or the option repeated); the selection's "
                                      "folder is written under output.dir here.",
                     show_default=False),
    ] = None,
    sample: SampleOpt = 1.0,
    gap: Annotated[
        str | None,
        typer.Option("--gap", help="Instead of training, report the domain gap of the connected clients, as "
                                   "`fedtune gap` does in a simulation: 'head' (the features the head reads) or a "
                                   "block (blocks_3); gap.json and gap.png are written under output.dir here.",
                     show_default=False),
    ] = None,
) -> None:
    """Run the server node: start Flower's SuperLink, run CONFIG on the clients that connect, then stop.

    Exits with the code of that run: 0 when it completed, 1 when it failed or was stopped.
    """
    cfg = _prepare(config, set_, simulation=False)  # a bad experiment fails here, before anything starts
    candidates = _candidates(select, cfg, option="--select") if select else None
    if select and gap:
        _fail("--select and --gap: choose one")
    _check_sample(sample)
    if sample != 1.0 and not select:
        _fail("--sample: applies to --select alone")
    task = {"select": " ".join(c.label for c in candidates), "select-sample": repr(sample)} if candidates else {}
    if gap:
        _check_gap(cfg, None if gap == "head" else gap, option="--gap")  # "head": fedtune.server.gap.GAP_AT_HEAD
        task = {"gap": gap}
    from fedtune.nodes import NodeError, serve

    try:
        code = serve(config, set_ or [], host=host, port=port, certs=certs, insecure=insecure, state_dir=state_dir,
                     authorized_keys=authorized_keys, task=task)
    except NodeError as error:
        _fail(str(error))
        return
    raise typer.Exit(code=code)


@cli.command()
def client(
    server: Annotated[str, typer.Option(help="The server's HOST:PORT.", show_default=False)],
    partition_id: Annotated[
        int | None,
        typer.Option(help="Train on this partition of the dataset in --data (without --data, only of a source "
                          "that needs no folder, such as digits). Without it, --data is this node's own dataset, "
                          "used whole."),
    ] = None,
    num_partitions: Annotated[
        int | None, typer.Option(help="How many partitions there are (checked against the server's config).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="This node's copy of the dataset (in place of the config's data.root).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where this node caches the model and features.")] = None,
    download: Annotated[
        bool, typer.Option("--download", help="Let this node download its dataset into --data (the server's "
                                              "data.download is never obeyed on a real node).")
    ] = False,
    cache_max_gb: Annotated[
        float | None, typer.Option(help="Cap on this node's cache of models and features, in GB (default: "
                                        "$FEDTUNE_CACHE_MAX_GB, else 10); least recently used entries go first.")
    ] = None,
    max_epsilon: Annotated[
        float | None, typer.Option(help="This node's own privacy budget: it then trains only under DP-SGD, to at "
                                        "most this epsilon over the run, whatever the server's settings say.")
    ] = None,
    max_delta: Annotated[
        float | None, typer.Option(help="The delta of --max-epsilon (default 1e-5): a server asking for a larger "
                                        "one is refused.")
    ] = None,
    root_certificates: Annotated[
        Path | None, typer.Option(help="The server's CA certificate (ca.crt from deploy/make-certs.sh).")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, for a server started with --insecure.")] = False,
    port: Annotated[int, typer.Option(help="Local port of this node's runtime API (one per node on a host).")] = 9094,
    auth_key: Annotated[
        Path | None, typer.Option(help="This node's private key (fedtune keygen), for a server with --authorized-keys.")
    ] = None,
    give_up_after: Annotated[
        float, typer.Option(help="Seconds to keep trying when the server refuses this node (its key not yet "
                                 "registered), before exiting.")
    ] = 600.0,
) -> None:
    """Run a client node: Flower's SuperNode, training on data that never leaves this machine.

    Every message is handled by this node's own installed fedtune; an app the server sends that is
    not the same fedtune (publisher, name, version, source files) is refused, never run.
    """
    from fedtune.nodes import NodeError, join

    try:
        code = join(server, partition_id=partition_id, num_partitions=num_partitions, data=data,
                    cache_dir=cache_dir, download=download, cache_max_gb=cache_max_gb, max_epsilon=max_epsilon,
                    max_delta=max_delta,
                    root_certificates=root_certificates, insecure=insecure, port=port,
                    auth_key=auth_key, give_up_after=give_up_after)
    except NodeError as error:
        _fail(str(error))
        return
    raise typer.Exit(code=code)


@cli.command()
def keygen(
    path: Annotated[Path, typer.Argument(help="Where to write the private key; the public key goes to PATH.pub.")],
) -> None:
    """Make this client node's key pair for SuperNode authentication; give PATH.pub to the server's operator."""
    from fedtune.nodes import NodeError, make_node_key

    try:
        public = make_node_key(path)
    except NodeError as error:
        _fail(str(error))
        return
    typer.echo(f"private key: {path} (keep it on this node)\npublic key: {public} (add it to the server's "
               "--authorized-keys)")


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)
