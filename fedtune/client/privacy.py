"""DP-SGD on a client, with a privacy ledger that spans the whole run and refuses to overspend.

Flower's Opacus example builds a new PrivacyEngine every round, so the epsilon it reports covers
one round. Here the accountant's history (noise multiplier, sample rate, steps of every round)
is kept in a ledger on the node's disk, restored into the accountant each round, and checked
before training: a round that would take the client past its budget is refused.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedtune.accounting import calibrate_noise_multiplier, check_history, sample_level_epsilon
from fedtune.atomic import write_text_atomically
from fedtune.backbones import StagedModel
from fedtune.client.fast_clipping import ChannelAffine, GhostClipping, unsupported_layers
from fedtune.config import DPSGDConfig, TrainConfig
from fedtune.engine import Metrics, make_optimizer, size_of
from fedtune.messages import PRIVACY_REFUSAL
from fedtune.params import freeze_all_but, set_train_mode
from fedtune.protocol import RefusedMessage

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

log = logging.getLogger("fedtune.client")


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would take this client past its (epsilon, delta) budget."""


@dataclass
class PrivacyLedger:
    """What one client has spent in one run: the accountant's history, and the fixed noise plan."""

    noise_multiplier: float | None = None
    sample_rate: float | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)  # (noise, sample rate, steps)

    def epsilon(self, *, delta: float, accountant: str, extra_steps: int = 0) -> float:
        """Epsilon of the recorded history, plus `extra_steps` more steps of the planned mechanism."""
        history = list(self.history)
        if extra_steps:
            assert self.noise_multiplier is not None and self.sample_rate is not None
            history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        return sample_level_epsilon(history, delta=delta, accountant=accountant)


class LedgerStore:
    """The ledger on the node's disk, one file per run, written atomically: it survives restarts."""

    def __init__(self, cache_root: Path, run_key: str) -> None:
        # The server's run key, not Flower's run id: a server that resumes a run after a restart
        # submits a new Flower run, and the budget spent so far must still count. The key has the
        # exact form ClientSettings.run_key allows (letters, digits, _ . -), so it stays one name.
        self.path = cache_root / "privacy" / f"run-{run_key}.json"

    def load(self) -> PrivacyLedger:
        if not self.path.is_file():
            return PrivacyLedger()
        # A damaged ledger is never read as an empty one: that would spend the budget a second time.
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            ledger = PrivacyLedger(
                noise_multiplier=None if data["noise_multiplier"] is None else float(data["noise_multiplier"]),
                sample_rate=None if data["sample_rate"] is None else float(data["sample_rate"]),
                history=check_history([(float(n), float(q), int(s)) for n, q, s in data["history"]]),
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"the privacy ledger {self.path} is damaged ({type(error).__name__}: {error}); this "
                             "node will not train in this run until it is restored (deleting it would forget the "
                             "privacy budget already spent)") from None
        return ledger

    def save(self, ledger: PrivacyLedger) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"noise_multiplier": ledger.noise_multiplier, "sample_rate": ledger.sample_rate,
                           "history": ledger.history})
        write_text_atomically(self.path, text)


class _StatisticsFrozenBatchNorm(nn.Module):
    """A BatchNorm layer, for the duration of a DP-SGD round, with its running statistics fixed.

    Each sample is normalised on its own, so per-sample gradients exist and DP-SGD can clip them;
    the affine weight and bias (the original layer's own Parameters) still train. Opacus refuses
    trainable layers with buffers, and its validator refuses every BatchNorm whatever its mode:
    so the statistics are plain tensors here, and the Parameters sit in a child module of their
    own (which ghost clipping clips per channel, and Opacus's hooks mode differentiates per sample
    with functorch). timm's BatchNormAct2d applies
    dropout and an activation after normalising: they are kept.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{bn} keeps no running statistics (track_running_stats=False): there are none to freeze")
        self.mean, self.var, self.eps = bn.running_mean, bn.running_var, bn.eps
        self.affine = ChannelAffine(bn.weight, bn.bias)
        self.drop = getattr(bn, "drop", nn.Identity())
        self.act = getattr(bn, "act", nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        normalised = (x - self.mean.view(shape)) * torch.rsqrt(self.var.view(shape) + self.eps)
        scaled = self.affine(normalised)
        out = self.act(self.drop(scaled))
        # Opacus's backward hook makes `scaled` a view that must not be modified in place, and
        # ResNet blocks add the shortcut in place (`out += identity`): hand out a copy then.
        return scaled.clone() if out is scaled else out


@contextmanager
def _opacus_compatible(modules: list[nn.Module]) -> Iterator[None]:
    """Within the block, the given modules fit per-sample gradients and compute exactly the same.

    BatchNorm layers become statistics-frozen (they are put back afterwards, so the model's
    state-dict names never change); in-place activations (ReLU6, Hardswish) stop working in
    place, since they would overwrite activations that Opacus's hooks keep.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    inplace: list[nn.Module] = []

    def prepare(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                swapped.append((parent, name, child))
                setattr(parent, name, _StatisticsFrozenBatchNorm(child))
            if getattr(child, "inplace", False) is True:
                inplace.append(child)
                child.inplace = False  # type: ignore[assignment]  # torch types any attribute Tensor | Module
            prepare(child)

    for module in modules:
        prepare(module)
    try:
        yield
    finally:
        for parent, name, original in swapped:
            setattr(parent, name, original)
        for module in inplace:
            module.inplace = True  # type: ignore[assignment]


class _Trainable(nn.Module):
    """The model from stage `start` on: what Opacus wraps (a frozen prefix ran once, earlier)."""

    def __init__(self, model: StagedModel, start: int) -> None:
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_stages(x, self.start)


def _private_epochs(
    module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int, device: torch.device
) -> tuple[float, int, int]:
    """The DP-SGD loop over Opacus's wrapped module, optimizer and loader: (summed loss, correct, seen)."""
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = module(inputs)
            if len(targets) == 0:
                # Poisson sampling drew an empty batch (Opacus's loader yields it with its shape):
                # the mechanism still takes its step, of pure noise. A backward pass through the
                # empty batch gives Opacus its empty per-sample gradients (the mean loss of no
                # example would be NaN); without it, optimizer.step() raised "Per sample gradient
                # is not initialized".
                (logits.sum() * 0.0).backward()
                optimizer.step()
                continue
            loss = loss_fn(logits, targets)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
    return total_loss, correct, seen


def _clipping_for(trainable: nn.Module, choice: str) -> str:
    """'ghost' or 'per_sample' (Opacus's hooks mode): what privacy.dp_sgd.clipping asks, where it can run."""
    if choice == "per_sample":
        return "per_sample"
    unsupported = unsupported_layers(trainable)
    if not unsupported:
        return "ghost"
    if choice == "ghost":
        raise ValueError(f"privacy.dp_sgd.clipping is ghost, but ghost clipping has no rule for "
                         f"{', '.join(unsupported)}: set it to auto (Opacus's per-sample gradients then) or per_sample")
    log.debug("DP-SGD clips with Opacus's per-sample gradients this round: ghost clipping has no rule for %s",
              ", ".join(unsupported))
    return "per_sample"


def _ghost_clipped_epochs(
    module: nn.Module,
    layers: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    accountant: IAccountant,
    dp: DPSGDConfig,
    noise_multiplier: float,
    epochs: int,
    device: torch.device,
    noise: torch.Generator,
) -> tuple[float, int, int]:
    """The DP-SGD loop with ghost clipping of `layers` (all of `module`'s trainable ones): the same mechanism,
    sampling and accounting as Opacus's make_private, the noise drawn from `noise`. Returns (summed loss,
    correct, seen)."""
    from opacus.data_loader import DPDataLoader

    # As make_private sets them (opacus/privacy_engine.py): the accountant's rate, and the batch
    # size a sum is divided by (int(N * q), not the drawn batch's size, which would leak it).
    sample_rate = 1 / len(loader)
    expected_batch_size = int(size_of(loader.dataset) * sample_rate)
    # Poisson sampling from the loader's own generator, as make_private does outside secure mode.
    batches = DPDataLoader.from_data_loader(loader) if dp.poisson_sampling else loader
    loss_fn = nn.CrossEntropyLoss(reduction="sum")  # each row of an output gradient is then one example's
    total_loss, correct, seen = 0.0, 0, 0
    with GhostClipping(layers, max_grad_norm=dp.max_grad_norm, noise_multiplier=noise_multiplier,
                       expected_batch_size=expected_batch_size, generator=noise) as clipping:
        for _ in range(epochs):
            for inputs, targets in batches:
                optimizer.zero_grad(set_to_none=True)
                if len(targets) == 0:
                    clipping.noise_only_gradients()  # Poisson sampling drew no example: a step of pure noise
                else:
                    inputs, targets = inputs.to(device), targets.to(device)
                    logits = module(inputs)
                    loss = loss_fn(logits, targets)
                    clipping.clipped_noised_gradients(loss, batch_size=len(targets))
                    total_loss += loss.item()
                    correct += int((logits.argmax(1) == targets).sum())
                    seen += len(targets)
                optimizer.step()
                # What Opacus's optimizer hook records for each step (IAccountant.get_optimizer_hook_fn).
                accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    optimizer.zero_grad(set_to_none=True)
    return total_loss, correct, seen


def within_node_budget(dp: DPSGDConfig, *, max_epsilon: float | None, max_delta: float) -> DPSGDConfig:
    """The DP-SGD settings this node trains with: the server's, held to the node's own floor.

    The server decides the experiment's privacy, but a node that set `max-epsilon` trusts no server
    with it: it trains only under DP-SGD, with Poisson sampling (what the accountant assumes), at a
    delta no larger than its own, and to the smaller of the two budgets (noise is calibrated to it,
    and the node refuses a round that would pass it). Raises RefusedMessage otherwise.
    """
    if max_epsilon is None:
        return dp
    if not dp.enabled:
        raise RefusedMessage("dp_sgd", f"this node trains only under DP-SGD (its max-epsilon is {max_epsilon:g}); "
                                       "the server's settings have it off")
    if not dp.poisson_sampling:
        raise RefusedMessage("dp_sgd.poisson_sampling", "this node's budget is accounted for Poisson sampling; the "
                                                        "server's settings turn it off")
    if dp.reproducible:
        raise RefusedMessage("dp_sgd.reproducible", "the server asks for noise seeded from the run's seed, which "
                                                    "it knows: this node's budget would not hold against it")
    if dp.target_delta > max_delta:
        raise RefusedMessage("dp_sgd.target_delta", f"{dp.target_delta:g} is above this node's max-delta "
                                                    f"{max_delta:g}")
    target = max_epsilon if dp.target_epsilon is None else min(dp.target_epsilon, max_epsilon)
    return dp.model_copy(update={"target_epsilon": target})


def train_private_round(
    model: StagedModel,
    data: Dataset,
    *,
    stages: list[str],
    cfg: TrainConfig,
    dp: DPSGDConfig,
    ledger: PrivacyLedger,
    planned_rounds: int,
    start: int = 0,
    seed: int = 0,
    device: torch.device,
) -> tuple[Metrics, float]:
    """One round of DP-SGD; updates `ledger` and returns the metrics and the run's epsilon so far.

    The noise multiplier is calibrated once, in the first round, for planned_rounds x
    local_epochs x batches per epoch, so that the whole plan fits target_epsilon. Batches hold
    dp.batch_size examples (all of them for "full"); never cfg.batch_size.
    """
    examples = size_of(data)
    if examples == 0:
        raise ValueError("no training examples on this client")
    if dp.batch_size == "auto":
        raise ValueError("dp_sgd.batch_size 'auto' is resolved by the server (ExperimentConfig.dp_batch_size)")
    batch_size = examples if dp.batch_size == "full" else min(dp.batch_size, examples)
    # The batches' draws (Poisson sampling) and the noise: amplification by sampling and the noise
    # itself assume both are secret, so by default nobody, the server included, knows their seeds.
    sampling = torch.Generator().manual_seed(seed if dp.reproducible else secrets.randbits(63))
    noise = torch.Generator(device=device).manual_seed(seed + 1 if dp.reproducible else secrets.randbits(63))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=sampling)
    steps = cfg.local_epochs * len(loader)
    if ledger.noise_multiplier is None:
        ledger.sample_rate = 1 / len(loader)  # Opacus's Poisson sampling rate for this loader
        if dp.noise_multiplier is not None:
            ledger.noise_multiplier = dp.noise_multiplier
        else:
            assert dp.target_epsilon is not None  # DPSGDConfig holds one of the two
            ledger.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=dp.target_epsilon,
                delta=dp.target_delta,
                sample_rate=ledger.sample_rate,
                steps=planned_rounds * steps,
                accountant=dp.accountant,
            )
    if dp.target_epsilon is not None:
        after = ledger.epsilon(delta=dp.target_delta, accountant=dp.accountant, extra_steps=steps)
        if after > dp.target_epsilon:
            spent = ledger.epsilon(delta=dp.target_delta, accountant=dp.accountant)
            raise PrivacyBudgetExhausted(
                f"{PRIVACY_REFUSAL}: this round would take epsilon from {spent:.3f} to {after:.3f}, "
                f"past the target {dp.target_epsilon} (delta {dp.target_delta}); the client refuses to train"
            )

    model.to(device)
    freeze_all_but(model, stages)
    set_train_mode(model, stages, freeze_statistics=True)
    # Here: only DP-SGD rounds pay for importing Opacus (fedtune/accounting.py).
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    engine = PrivacyEngine(accountant=dp.accountant)
    engine.accountant.history = list(ledger.history)
    with _opacus_compatible([model.stages[stage] for stage in stages]):
        trainable = _Trainable(model, start)
        # The stages that run from `start` on are the trainable ones: only they need checking and hooks.
        running = nn.ModuleDict({stage: model.stages[stage] for stage in stages})
        problems = ModuleValidator.validate(running, strict=False)
        if problems:
            raise ValueError(f"DP-SGD cannot train these layers (stages {', '.join(stages)}): {problems[0]}")
        optimizer = make_optimizer(model, stages, cfg)
        if _clipping_for(running, dp.clipping) == "ghost":
            total_loss, correct, seen = _ghost_clipped_epochs(
                trainable, running, optimizer, loader, accountant=engine.accountant, dp=dp,
                noise_multiplier=ledger.noise_multiplier, epochs=cfg.local_epochs, device=device, noise=noise,
            )
        else:
            module, optimizer, private_loader = engine.make_private(
                module=trainable,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=ledger.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=dp.poisson_sampling,
                noise_generator=noise,
            )
            try:
                total_loss, correct, seen = _private_epochs(module, optimizer, private_loader, cfg.local_epochs,
                                                            device)
            finally:
                module.to_standard_module()  # removes Opacus's hooks and per-sample gradients from the model
    model.eval()
    ledger.history = list(engine.accountant.history)
    epsilon = ledger.epsilon(delta=dp.target_delta, accountant=dp.accountant)
    metrics = Metrics(loss=total_loss / max(seen, 1), accuracy=correct / max(seen, 1), num_examples=size_of(data))
    return metrics, epsilon
