"""The run's plots, drawn from its round records: accuracy, bytes and (under DP) epsilon by round.

Each is a matplotlib Figure on the Agg canvas; fedtune/report.py saves them as PNG files in the run's folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, PercentFormatter

from fedtune.console import format_bytes
from fedtune.records import ClientSpread, RoundRecord

# Draws one plot on the axes from the records, titled with the run's name; False: nothing to show.
Draw = Callable[[Axes, list[RoundRecord], str], bool]

# Bytes are drawn on a log axis when the largest bar is this many times the smallest: on a linear
# one, the full-backbone delivery of round 1 flattens every later head-only round to nothing.
_LOG_SCALE_RATIO = 100.0
# Past this many rounds, per-bar byte labels overlap and are left out.
_MAX_LABELLED_ROUNDS = 12


def figure_of(draw: Draw, records: list[RoundRecord], run_name: str) -> Figure | None:
    """One plot as a Figure, or None when it has nothing to show."""
    figure = Figure(figsize=(8, 4.8), layout="constrained")
    FigureCanvasAgg(figure)  # Agg directly: no pyplot, no global backend, safe off the main thread
    return figure if draw(figure.add_subplot(), records, run_name) else None


def _round_axis(ax: Axes, rounds: list[int]) -> None:
    ax.set_xlabel("round")
    # One tick per round while they fit; MaxNLocator keeps ticks on whole rounds past that.
    if len(rounds) <= 20:
        ax.set_xticks(rounds)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mark_unfreezing(ax: Axes, records: list[RoundRecord]) -> None:
    """A dotted line where more blocks start training: jumps in accuracy and bytes often sit there."""
    trained = [r for r in records if r.round > 0]
    for previous, current in zip(trained, trained[1:], strict=False):
        if current.trainable_blocks != previous.trainable_blocks:
            ax.axvline(current.round - 0.5, color="grey", linestyle=":", linewidth=1)
            # Written just above the frame, where no bar, point or label can hide it.
            ax.text(
                current.round - 0.5,
                1.01,
                f"blocks: {current.trainable_blocks}",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="dimgrey",
            )


def draw_accuracy(ax: Axes, records: list[RoundRecord], run_name: str) -> bool:
    # The best value is labelled above the central line and below the federated one, so the two
    # labels do not collide when both peak in the same round.
    # Federated evaluation may skip rounds (federation.evaluation.every): its line joins the rounds that had one.
    sampled = " in the rounds that had one" if any(r.evaluations_sampled == 0 for r in records if r.round > 0) else ""
    series = (
        ("central (server's held-out set)", "central_accuracy", "tab:blue", "o", 8),
        (f"federated (clients' validation splits{sampled})", "federated_accuracy", "tab:orange", "s", -14),
    )
    drawn = False
    for label, attribute, color, marker, label_offset in series:
        points = [(r.round, getattr(r, attribute)) for r in records if getattr(r, attribute) is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=marker, color=color, label=label)
        best_round, best = max(points, key=lambda point: point[1])
        ax.annotate(
            f"{best:.1%}",
            (best_round, best),
            textcoords="offset points",
            xytext=(0, label_offset),
            ha="center",
            fontsize=8,
            color=color,
        )
        drawn = True
    if not drawn:
        return False
    # Headroom above 100% for the best-value labels.
    _accuracy_frame(ax, records, f"Accuracy per round (round 0 = before training)\n{run_name}", top=1.08)
    return True


def _accuracy_frame(ax: Axes, records: list[RoundRecord], title: str, *, top: float) -> None:
    """Title, a percent axis up to `top`, the rounds, where blocks unfreeze, the legend below."""
    ax.set_title(title, pad=16)
    ax.set_ylabel("accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]), top=top)
    ax.grid(alpha=0.3)
    _round_axis(ax, [r.round for r in records])
    _mark_unfreezing(ax, records)
    _legend_below(ax)


def draw_clients(ax: Axes, records: list[RoundRecord], run_name: str) -> bool:
    """Each client's accuracy on its own validation split, round by round, with their median and the
    mean of the worst 10%: where one global model serves some clients and fails others."""
    rounds = [r for r in records if r.client_accuracy]
    if not rounds:
        return False
    for record in rounds:
        values = sorted(record.client_accuracy.values())
        # Spread sideways by rank so that equal accuracies stay visible as separate clients.
        offsets = [0.3 * (index / max(len(values) - 1, 1) - 0.5) for index in range(len(values))]
        ax.scatter([record.round + offset for offset in offsets], values, s=12, color="tab:grey", alpha=0.6,
                   label="a client" if record is rounds[0] else None)
    xs = [r.round for r in rounds]
    spreads = [ClientSpread.of(r.client_accuracy.values()) for r in rounds]
    ax.plot(xs, [s.median for s in spreads], marker="o", color="tab:orange", label="median client, global model")
    ax.plot(xs, [s.mean for s in spreads], linestyle="--", color="tab:blue",
            label="mean over clients, global model")
    ax.plot(xs, [s.worst10 for s in spreads], marker="v", color="tab:red",
            label="worst 10% of clients (mean), global model")
    own = [r for r in rounds if r.client_personal_accuracy]  # under personalization: each client's own model
    if own:
        personal = [ClientSpread.of(r.client_personal_accuracy.values()) for r in own]
        ax.plot([r.round for r in own], [s.median for s in personal], marker="o", color="tab:green",
                label="median client, its own model")
        ax.plot([r.round for r in own], [s.worst10 for s in personal], marker="v", color="tab:purple",
                label="worst 10%, their own models")
    _accuracy_frame(ax, records, f"Each client's accuracy on its own validation split (dots: the global model)"
                                 f"\n{run_name}", top=1.05)
    return True


def _legend_below(ax: Axes) -> None:
    # Outside the axes: inside, it would sit on top of some round's bars or points.
    ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=9, frameon=False)


def draw_bytes(ax: Axes, records: list[RoundRecord], run_name: str) -> bool:
    # Round 0 is an evaluation on the server alone: nothing travels.
    trained = [r for r in records if r.round > 0]
    if not trained:
        return False
    rounds = [r.round for r in trained]
    sent = [r.bytes_sent for r in trained]
    received = [r.bytes_received for r in trained]
    backbone = [r.bytes_sent_backbone for r in trained]
    width = 0.4
    sent_x = [x - width / 2 for x in rounds]
    sent_bars = ax.bar(sent_x, sent, width, color="tab:blue", label="sent (server → clients)")
    if any(backbone):
        ax.bar(
            sent_x,
            backbone,
            width,
            facecolor="none",
            edgecolor="navy",
            hatch="//",
            linewidth=0,
            label="of which full-model deliveries",
        )
    received_bars = ax.bar(
        [x + width / 2 for x in rounds], received, width, color="tab:green", label="received (clients → server)"
    )

    nonzero = [v for v in sent + received if v > 0]
    log_scale = bool(nonzero) and max(nonzero) > _LOG_SCALE_RATIO * min(nonzero)
    # Headroom above the tallest bar for the upright value labels.
    if log_scale:
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(nonzero) / 2, top=max(nonzero) * 12)
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0, top=max(nonzero, default=1) * 1.35)
    # Tick labels carry their own unit (KB, MB, ...), so a log axis spanning several stays readable.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: format_bytes(round(value)).replace(".0 ", " ")))
    if len(trained) <= _MAX_LABELLED_ROUNDS:
        for bars in (sent_bars, received_bars):
            labels = [format_bytes(round(b.get_height())) for b in bars]
            ax.bar_label(bars, labels=labels, rotation=90, fontsize=7, padding=3)

    scale_note = ", log scale" if log_scale else ""
    ax.set_title(f"Bytes per round{scale_note}\n{run_name}", pad=16)
    ax.set_ylabel("bytes per round")
    ax.grid(axis="y", alpha=0.3)
    _round_axis(ax, rounds)
    _mark_unfreezing(ax, records)
    _legend_below(ax)
    return True


# Up to this many clients, each one's epsilon line has a colour and a legend entry of its own.
_NAMED_CLIENT_LINES = 10


def draw_epsilon(
    ax: Axes, records: list[RoundRecord], run_name: str, *, budget: float | None,
    client_names: Mapping[int, str] | None = None,
) -> bool:
    """Epsilon by round: each client's (named after `client_names`: on real nodes, the partition a
    node gave with its node id), the largest, and central DP's user-level one."""
    trained = [r for r in records if r.round > 0]
    clients = sorted({int(k.rsplit("_", 1)[1]) for r in trained for k in r.extra if k.startswith("epsilon_client_")})
    user = [(r.round, r.extra["epsilon_user"]) for r in trained if "epsilon_user" in r.extra]
    if not clients and not user:
        return False
    names = client_names or {}
    named = len(clients) <= _NAMED_CLIENT_LINES
    for index, client in enumerate(clients):
        key = f"epsilon_client_{client}"
        points = [(r.round, r.extra[key]) for r in trained if key in r.extra]
        xs, ys = zip(*points, strict=True)
        name = names.get(client, f"client {client}")
        if named:
            ax.plot(xs, ys, color=f"C{index % 10}", alpha=0.6, linewidth=1, marker=".", label=name)
        else:
            label = f"each of {len(clients)} clients' sample-level epsilon (DP-SGD)" if index == 0 else None
            ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=1, marker=".", label=label)
    if clients and not named:
        # Too many to name: the one that spent most is the one a reader looks for.
        last = trained[-1].extra
        spender = max((c for c in clients if f"epsilon_client_{c}" in last),
                      key=lambda c: last[f"epsilon_client_{c}"], default=None)
        if spender is not None:
            ax.annotate(names.get(spender, f"client {spender}"), (trained[-1].round, last[f"epsilon_client_{spender}"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    if clients:
        points = [(r.round, r.extra["epsilon_max"]) for r in trained if "epsilon_max" in r.extra]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color="tab:blue", linewidth=2, marker="o", label="largest client epsilon")
    if user:
        xs, ys = zip(*user, strict=True)
        ax.plot(xs, ys, color="tab:purple", linewidth=2, marker="s", label="user-level epsilon (central DP)")
    if budget is not None:
        ax.axhline(budget, color="tab:red", linestyle="--", linewidth=1, label=f"budget epsilon = {budget:g}")
    ax.set_title(f"Privacy spent by round (cumulative epsilon)\n{run_name}", pad=16)
    ax.set_ylabel("epsilon")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _round_axis(ax, [r.round for r in trained])
    _legend_below(ax)
    return True
