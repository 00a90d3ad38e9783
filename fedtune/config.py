"""The experiment file: a typed, validated description of one run, loaded once."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fedtune import strict_yaml

# Experiment files are a few KB; this bounds what a mistaken path (a dataset, a log) costs to read.
MAX_CONFIG_BYTES = 1 << 20
# Values and keys quoted in error messages are cut to this many characters.
MAX_SHOWN_CHARS = 80


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


# Bounds of the settings that travel to clients (fedtune.protocol.ClientSettings): far above any real experiment,
# they keep what a server can make a node allocate, or spend time on, finite. Every float below
# has an upper bound too, which also keeps out inf (JSON's Infinity, or 1e400).
MAX_ROUNDS = 10_000  # federation.rounds
MAX_CLIENTS = 1_000_000  # federation.num_clients
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; the head of a 2048-feature backbone is then 820 MB
MAX_LOCAL_EPOCHS = 1_000
MAX_BATCH_SIZE = 65_536
# DP-SGD's `auto` batch is the full batch only for runs of at least this many local epochs in all:
# fewer full-batch steps trained the head less well than mini-batches (benchmarks/private_head.py).
FULL_BATCH_MIN_EPOCHS = 32
MAX_BLOCKS = 1_000  # trainable_blocks, unfreeze steps, lr_multipliers entries (backbones have tens of stages)
MAX_RATE = 1_000.0  # lr, weight_decay, lr multipliers
MAX_DP_SCALE = 1e6  # DP-SGD epsilon, noise multiplier and clipping norm; central DP's clipping norm
MAX_PROXIMAL_MU = 1_000.0  # FedProx's paper tries 0.001 .. 1
MAX_SECAGG_SCALE = 1e12  # SecAgg+ clipping range and maximum weight
SECAGG_MODULUS = 2**32  # Flower's default modulus_range: SecAgg+'s masks and modular sum live in [0, 2**32)
# Central DP on the SecAgg+ sum: the quantisation error's standard deviation may reach at most this
# fraction of the noise's (ExperimentConfig.secure_quantization_to_noise).
MAX_QUANTIZATION_TO_NOISE = 0.01
MAX_NAME_CHARS = 256  # backbone and data source names
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (np.random.seed) takes 0 .. 2**32 - 1


def cut(text: str) -> str:
    """Text from the user for an error message, cut to MAX_SHOWN_CHARS: a value may be megabytes long."""
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return f"{text[:MAX_SHOWN_CHARS]}... ({len(text)} characters)"


def shown(value: object) -> str:
    """repr(value), cut for an error message."""
    return cut(repr(value))


class Section(BaseModel):
    # Unknown keys are errors (typos must not be silently ignored); configs never change after load.
    # Strict: `true` is not the number 1, and 1e18 or 2.5 is not an integer (a whole float would
    # otherwise be truncated into one); integers are still accepted where a float is expected.
    # Infinities and NaN are no setting's meaningful value.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelConfig(Section):
    backbone: Annotated[str, Field(max_length=MAX_NAME_CHARS)] = "efficientnet_lite0"
    # "imagenet": the backbone's published pretrained weights; "none": random init;
    # anything else: a path to a .safetensors file or a plain torch state dict.
    weights: Annotated[str, Field(max_length=MAX_PATH_CHARS)] = "imagenet"
    head_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # A block after which the backbone ends (an earlier cut point; `fedtune select` ranks them):
    # the head reads that block's average-pooled output. null: the whole backbone.
    cut: Annotated[str | None, Field(max_length=MAX_NAME_CHARS, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = None

    @model_validator(mode="after")
    def _backbone_known(self) -> ModelConfig:
        from fedtune.backbones import BACKBONES

        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {shown(self.backbone)}; known: {', '.join(sorted(BACKBONES))}")
        return self


class PartitionConfig(Section):
    scheme: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: Annotated[float, Field(gt=0.0, le=1e6)] = 0.5
    shards_per_client: Annotated[int, Field(ge=1, le=10_000)] = 2
    # Dirichlet draws are repeated until every client holds at least this many examples.
    min_examples: Annotated[int, Field(ge=1, le=1_000_000)] = 2


class DataConfig(Section):
    # digits | hymenoptera | imagefolder | torchvision:<DatasetClass> (e.g. torchvision:CIFAR10)
    source: Annotated[str, Field(max_length=MAX_NAME_CHARS)] = "digits"
    # Where the data lives (hymenoptera, imagefolder, torchvision); relative paths are resolved
    # against the directory the command is run from.
    root: Annotated[str | None, Field(max_length=MAX_PATH_CHARS)] = None
    download: bool = False
    # Side of the square image given to the backbone; None keeps the weights' own crop size.
    image_size: Annotated[int | None, Field(ge=16, le=1024)] = None
    augment: bool = False
    # An image file that cannot be decoded safely (not an image, corrupt, truncated, or more pixels
    # than fedtune.data.images.MAX_IMAGE_PIXELS): "error" stops, naming the file; "skip" leaves it out with
    # a warning naming it (every image is then decoded once when the data is loaded, to find them).
    bad_images: Literal["error", "skip"] = "error"
    partition: PartitionConfig = PartitionConfig()
    # Fraction of each client's examples kept aside for its local validation.
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    # Fraction of each client's training split it trains on (the data-efficiency study,
    # benchmarks/efficiency.py): a seeded, nested, class-stratified subsample of ceil(fraction x n)
    # examples, so at least one; the partition and the validation split stay as they are.
    train_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0

    @model_validator(mode="after")
    def _source_known(self) -> DataConfig:
        from fedtune.data import check_source

        check_source(self.source)  # names the source and its argument (torchvision:<a dataset class>)
        return self


# A host name, an IPv4 address, or an IPv6 address in brackets (as in [fd00::5]:6379).
_RAY_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


class EvaluationConfig(Section):
    """Federated evaluation: each round's new model on sampled clients' local validation splits.

    Each evaluation is a second exchange in its round (a message to every sampled client, carrying
    the trainable tensors, and its reply); a round without one sends nothing more after training,
    and its history row has federated_loss/accuracy null and evaluations_sampled 0.
    """

    enabled: bool = True
    # Evaluate in rounds every, 2 x every, ... and always in the last round (federation.rounds).
    every: Annotated[int, Field(ge=1, le=MAX_ROUNDS)] = 1
    # Clients sampled per evaluation, as a count (clients_per_round) or a fraction of num_clients
    # (fraction, at least one client); neither: as many as train each round.
    clients_per_round: Annotated[int | None, Field(ge=1, le=MAX_CLIENTS)] = None
    fraction: Annotated[float | None, Field(gt=0.0, le=1.0)] = None

    @model_validator(mode="after")
    def _one_way_to_size(self) -> EvaluationConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set clients_per_round or fraction, not both: they are two ways to say how many "
                             "clients evaluate")
        return self


class FederationConfig(Section):
    num_clients: Annotated[int, Field(ge=1, le=MAX_CLIENTS)] = 10
    # Clients sampled for training each round; None means all of them. Under central DP the expected
    # number: each client is drawn with probability clients_per_round / num_clients (Poisson).
    clients_per_round: Annotated[int | None, Field(ge=1)] = None
    # Fewest clients able to train for a round to go ahead: clients at their privacy budget are
    # left out of sampling, and when fewer than this remain the run ends.
    min_clients: Annotated[int, Field(ge=1)] = 1
    rounds: Annotated[int, Field(ge=1, le=10_000)] = 5
    # Resources of one virtual client in simulation (Ray). num_gpus may be fractional.
    client_cpus: Annotated[int, Field(ge=1)] = 1
    client_gpus: Annotated[float, Field(ge=0.0)] = 0.0
    # Seconds the server waits for one round's replies.
    round_timeout: Annotated[float, Field(gt=0.0)] = 3600.0
    # Seconds the server waits, before round 1, for num_clients nodes to be connected.
    connect_timeout: Annotated[float, Field(gt=0.0)] = 120.0
    # Simulation only: the Ray cluster that runs the virtual clients. None starts a Ray of this
    # run's own on this machine; "HOST:PORT" attaches to the head started with
    # `ray start --head --port PORT`; "auto" lets Ray find one (RAY_ADDRESS, else the cluster
    # `ray start` last started on this machine). deploy/README.md has the recipe.
    ray_address: str | None = None
    evaluation: EvaluationConfig = EvaluationConfig()

    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    @property
    def evaluated_per_round(self) -> int:
        """Clients sampled for each federated evaluation (evaluation.clients_per_round or .fraction)."""
        evaluation = self.evaluation
        if evaluation.clients_per_round is not None:
            return evaluation.clients_per_round
        if evaluation.fraction is not None:
            # The nearest count below, without float noise (0.29 x 100 is 28.999999999999996).
            return max(1, math.floor(evaluation.fraction * self.num_clients + 1e-9))
        return self.sampled_per_round

    def evaluates_in(self, server_round: int) -> bool:
        """Whether federated evaluation follows training in this round (every k rounds, and the last)."""
        evaluation = self.evaluation
        return evaluation.enabled and (server_round % evaluation.every == 0 or server_round == self.rounds)

    @field_validator("ray_address")
    @classmethod
    def _ray_address_form(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        if "://" in value:
            # Ray Client would run the virtual clients' driver here and its workers elsewhere with
            # this machine's paths; start `fedtune simulate` on a node of the cluster instead.
            raise ValueError("Ray Client addresses (ray://...) are not supported: run fedtune simulate on a node "
                             "of the cluster, with HOST:PORT of the head's GCS (ray start --head --port)")
        if value == "local":
            raise ValueError("leave ray_address unset (null) for a local Ray of this run's own")
        host, _, port = value.rpartition(":")
        if not _RAY_HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be 'auto' or HOST:PORT of a Ray head (the port given to ray start --head "
                             "--port, default 6379), e.g. 10.0.0.5:6379 or [fd00::5]:6379")
        return value

    @model_validator(mode="after")
    def _sample_fits(self) -> FederationConfig:
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds num_clients ({self.num_clients})"
            )
        if self.min_clients > self.sampled_per_round:
            raise ValueError(f"min_clients ({self.min_clients}) exceeds the clients sampled per round "
                             f"({self.sampled_per_round})")
        return self

    @model_validator(mode="after")
    def _evaluation_fits(self) -> FederationConfig:
        wanted = self.evaluation.clients_per_round
        if wanted is not None and wanted > self.num_clients:
            raise ValueError(f"evaluation.clients_per_round ({wanted}) exceeds num_clients ({self.num_clients})")
        return self


class UnfreezeStep(Section):
    from_round: Annotated[int, Field(ge=2, le=MAX_ROUNDS)]
    trainable_blocks: Annotated[int, Field(ge=0, le=MAX_BLOCKS)] | Literal["all"]


# A module name inside a stage, as `fedtune backbones` and PyTorch print it ("conv_pw", "0.block.3").
_MODULE_NAME = r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$"
MAX_LORA_RANK = 1024


class LoraSettings(Section):
    """LoRA adapters (train.adapter: lora): W x + (alpha / rank) B A x, with A (rank x in) and B (out x rank)
    trained and the pretrained W frozen (Hu et al. 2021), through PEFT (fedtune/adapters.py)."""

    rank: Annotated[int, Field(ge=1, le=MAX_LORA_RANK)] = 8
    alpha: Annotated[int, Field(ge=1, le=MAX_LORA_RANK * 16)] = 16
    # Dropout on the adapter's input (PEFT's lora_dropout).
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # auto: every linear layer, 1x1 convolution and attention layer of the adapted blocks. Or module
    # names, each matching a module of that name or ending in "." + it, in any adapted block.
    target_modules: Literal["auto"] | Annotated[
        tuple[Annotated[str, Field(max_length=MAX_NAME_CHARS, pattern=_MODULE_NAME)], ...],
        Strict(False), Field(min_length=1, max_length=MAX_BLOCKS),
    ] = "auto"


class TrainConfig(Section):
    # How many of the backbone's last blocks train with the head: 0 is feature extraction,
    # "all" is full fine-tuning. An unfreeze schedule raises it at given rounds.
    trainable_blocks: Annotated[int, Field(ge=0, le=MAX_BLOCKS)] | Literal["all"] = 0
    # Strict(False): a YAML list is welcome here.
    unfreeze: Annotated[tuple[UnfreezeStep, ...], Strict(False), Field(max_length=MAX_BLOCKS)] = ()
    local_epochs: Annotated[int, Field(ge=1, le=MAX_LOCAL_EPOCHS)] = 1
    # Memory per step is bounded by min(batch_size, the client's examples) images.
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] = 32
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0.0, le=MAX_RATE)] = 0.01
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0, le=MAX_RATE)] = 0.0
    # Discriminative learning rates: block i below the head trains at lr * decay**i.
    lr_decay_per_block: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    # Or name the multiplier of a layer group (stage) directly, e.g. {conv_head: 0.1}; these win
    # over the decay. `fedtune backbones` lists the stage names.
    lr_multipliers: Annotated[
        dict[Annotated[str, Field(max_length=MAX_NAME_CHARS)], Annotated[float, Field(gt=0.0, le=MAX_RATE)]],
        Field(max_length=MAX_BLOCKS),
    ] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision on CUDA (ignored on CPU).
    amp: bool = False
    # Parameter-efficient fine-tuning of the trainable blocks (fedtune/adapters.py): none trains them
    # whole; lora trains low-rank adapters beside their frozen weights (`lora`); bitfit trains their
    # biases alone. Either way only those tensors (and the head, which trains whole) travel.
    adapter: Literal["none", "lora", "bitfit"] = "none"
    lora: LoraSettings = LoraSettings()

    @model_validator(mode="after")
    def _unfreeze_monotonic(self) -> TrainConfig:
        # Blocks only ever thaw: a block frozen again after training would leave clients holding
        # a stale cached copy of it.
        def rank(blocks: int | str) -> float:
            return float("inf") if blocks == "all" else float(blocks)

        previous_round, previous_blocks = 1, self.trainable_blocks
        for step in self.unfreeze:
            if step.from_round <= previous_round:
                raise ValueError("unfreeze steps must have strictly increasing from_round values")
            if rank(step.trainable_blocks) < rank(previous_blocks):
                raise ValueError("unfreeze steps must not decrease trainable_blocks (blocks never refreeze)")
            previous_round, previous_blocks = step.from_round, step.trainable_blocks
        return self

    @model_validator(mode="after")
    def _adapter_has_blocks(self) -> TrainConfig:
        if self.adapter != "none" and self.widest_blocks == 0:
            raise ValueError(f"adapter: {self.adapter} adapts the trainable blocks below the head, and "
                             "trainable_blocks is 0 in every round (the head alone trains whole): train at "
                             "least one block, or set adapter: none")
        return self

    @property
    def widest_blocks(self) -> int | Literal["all"]:
        """The most blocks that train in any round: blocks only ever thaw, so the last step's."""
        return self.unfreeze[-1].trainable_blocks if self.unfreeze else self.trainable_blocks

    def trainable_blocks_at(self, server_round: int) -> int | Literal["all"]:
        """Trainable blocks below the head in a given round, after the unfreeze schedule."""
        blocks = self.trainable_blocks
        for step in self.unfreeze:
            if server_round >= step.from_round:
                blocks = step.trainable_blocks
        return blocks


class UpdateBoundConfig(Section):
    """Bounds on every client's train update before aggregation (`strategy.bound`).

    An update is what a client sends minus the tensors the server sent it. Its norm is compared
    with the round's median update norm, parameters and BatchNorm statistics separately (they move
    on different scales), so no scale has to be known in advance; and the weight its
    `num-examples` gives it is capped. A median holds while fewer than half of a round's usable
    updates are hostile.
    """

    # auto: on, except with secure aggregation (the server never sees a single update) and with
    # central DP (its clipping bounds every update already, and its noise is calibrated to that).
    enabled: bool | Literal["auto"] = "auto"
    # An update whose norm is over norm_ratio x the round's median update norm is left out
    # (reject) or scaled down to that norm (clip). null: no norm bound.
    norm_ratio: Annotated[float | None, Field(gt=1.0, allow_inf_nan=False)] = 3.0
    norm_action: Literal["reject", "clip"] = "reject"
    # A client's num-examples counts for at most weight_ratio x the round's median num-examples,
    # and at most max_examples. null: no such cap.
    weight_ratio: Annotated[float | None, Field(ge=1.0, allow_inf_nan=False)] = 2.0
    max_examples: Annotated[int | None, Field(ge=1)] = None


# Strategies that keep out hostile updates by their position among the others (Flower's).
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


class StrategyConfig(Section):
    name: Literal[
        "fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"
    ] = "fedavg"
    # FedProx: weight of the proximal term clients add to their loss.
    proximal_mu: Annotated[float, Field(ge=0.0, le=MAX_PROXIMAL_MU)] = 0.01
    # FedAdam / FedYogi server optimiser.
    eta: Annotated[float, Field(gt=0.0)] = 0.01
    beta_1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    beta_2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.99
    tau: Annotated[float, Field(gt=0.0)] = 1e-3
    # FedTrimmedAvg: the fraction of updates cut at each end, coordinate by coordinate.
    trim_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.2
    # Krum, MultiKrum, Bulyan: how many hostile clients a round tolerates (their f).
    num_malicious: Annotated[int, Field(ge=0)] = 1
    # MultiKrum: how many of the best-scored updates are averaged; null: clients per round - num_malicious.
    num_selected: Annotated[int | None, Field(ge=1)] = None
    bound: UpdateBoundConfig = UpdateBoundConfig()


class DPSGDConfig(Section):
    """Sample-level differential privacy on each client (DP-SGD with Opacus)."""

    enabled: bool = False
    # The guarantee for the whole run, per client: noise is calibrated once so that the planned
    # rounds x local epochs spend at most this. Or give noise_multiplier and let epsilon follow.
    target_epsilon: Annotated[float | None, Field(gt=0.0, le=MAX_DP_SCALE)] = 3.0
    target_delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    noise_multiplier: Annotated[float | None, Field(gt=0.0, le=MAX_DP_SCALE)] = None
    max_grad_norm: Annotated[float, Field(gt=0.0, le=MAX_DP_SCALE)] = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    poisson_sampling: bool = True
    # How per-sample gradients are clipped (the mechanism and its epsilon are the same either way):
    # "ghost" computes their norms without building them (fedtune/client/fast_clipping.py) and
    # refuses a layer it has no rule for; "per_sample" is Opacus's hooks mode; "auto" is ghost
    # when every trainable layer has a rule, per_sample otherwise.
    clipping: Literal["auto", "ghost", "per_sample"] = "auto"
    # Examples per step (the expected number, under Poisson sampling). "full": every step uses all
    # of the client's examples (DP-GD at sampling rate 1, one step per local epoch; no batch is ever
    # empty). "auto": full when only the head trains, all run, for at least FULL_BATCH_MIN_EPOCHS
    # local epochs in all, train.batch_size otherwise (the README's privacy study: DP-GD on cached
    # features was as accurate as training without DP on ants/bees, and needs that many steps).
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] | Literal["auto", "full"] = "auto"
    # The noise and the Poisson draws come from a generator seeded from the OS's entropy, known to
    # nobody; `true` seeds it from the run's seed instead, for tests and debugging: then anyone who
    # knows the seed (the server chooses it) can regenerate the noise, and the guarantee is void.
    reproducible: bool = False

    @model_validator(mode="after")
    def _one_way_to_set_noise(self) -> DPSGDConfig:
        if self.enabled and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("set target_epsilon (noise is calibrated to it) or noise_multiplier")
        return self


class CentralDPConfig(Section):
    """User-level differential privacy added by the server (fedtune/strategies/central_dp.py).

    Each client's whole update is clipped to clipping_norm (by the server, or by the client with
    `client`), and Gaussian noise of noise_multiplier x clipping_norm / clients_per_round is added
    to their sum over clients_per_round, every round, drawn from OS entropy unless `reproducible`.
    `adaptive` tunes the clipping norm towards a quantile of the update norms.
    With privacy.secure_aggregation only `client` can work: each client clips its own update,
    SecAgg+ sums them, and the server adds the noise to the sum.
    """

    enabled: bool = False
    clipping: Literal["server", "client", "adaptive"] = "server"
    noise_multiplier: Annotated[float, Field(gt=0.0)] = 1.0
    clipping_norm: Annotated[float, Field(gt=0.0, le=MAX_DP_SCALE)] = 1.0  # the initial norm for `adaptive`
    target_delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5  # delta of the reported user-level epsilon
    # `adaptive` only: the quantile of update norms to clip at, and how fast the norm follows it.
    target_clipped_quantile: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    clip_norm_lr: Annotated[float, Field(gt=0.0)] = 0.2
    # Noise on the count of clipped updates; Flower's default is clients_per_round / 20, and it
    # must exceed noise_multiplier / 2 (part of the privacy budget goes to this count).
    clipped_count_stddev: Annotated[float | None, Field(gt=0.0)] = None
    # For tests only: the client draw and the noise follow `seed` instead of OS entropy, so that a
    # run can be repeated. The guarantee then does not hold against anyone who knows the seed
    # (config.json records it); privacy.json says which.
    reproducible: bool = False


class SecureAggregationConfig(Section):
    """SecAgg+ (Flower's legacy workflow): the server only ever sees the sum of the updates.

    num_shares (how many clients hold shares of each client's mask secrets) is a count of clients
    above 1, or a fraction of the sampled clients up to 1 (1.0: all of them);
    reconstruction_threshold (how many of those shares must come back) is a count, or a fraction
    of num_shares. Clients send updates scaled by num_examples / max_weight, which must fit in
    [-clipping_range, clipping_range] (clients refuse otherwise) and are quantised to
    quantization_range levels before masking. With privacy.central every update counts the same
    (weight 1, so max_weight is not used) and clipping_range must cover central.clipping_norm.
    """

    enabled: bool = False
    num_shares: Annotated[float, Field(gt=0.0)] = 1.0
    reconstruction_threshold: Annotated[float, Field(gt=0.0)] = 0.67
    clipping_range: Annotated[float, Field(gt=0.0, le=MAX_SECAGG_SCALE)] = 8.0
    quantization_range: Annotated[int, Field(ge=2)] = 4194304
    max_weight: Annotated[float, Field(gt=0.0, le=MAX_SECAGG_SCALE)] = 1000.0


class PrivacyConfig(Section):
    dp_sgd: DPSGDConfig = DPSGDConfig()
    central: CentralDPConfig = CentralDPConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()

    @property
    def freezes_statistics(self) -> bool:
        """BatchNorm running statistics mix the samples of a batch: DP-SGD cannot clip one sample's
        share of them, and noise added to a running variance can make it negative. Under either
        kind of DP they stay at the pretrained values (on server and clients alike) and never travel."""
        return self.dp_sgd.enabled or self.central.enabled


class PersonalizationConfig(Section):
    """What of the trainable part stays on each client, trained there and never sent (fedtune/client/personal.py).

    none: everything that trains travels (one global model). fedbn: the BatchNorm running statistics
    of the trainable stages stay local (Li et al. 2021), and with `fedbn_affine` their weight and
    bias too. local_head: the head stays local and only the trainable body travels (FedPer). local:
    nothing travels, each client trains alone from the pretrained backbone: the local-only baseline.
    finetune: everything travels, and at each evaluation every client fine-tunes the global model
    on its training split for `finetune_epochs` (default 1) before measuring its own model; nothing
    is kept between rounds.
    """

    method: Literal["none", "fedbn", "local_head", "local", "finetune"] = "none"
    fedbn_affine: bool = False
    finetune_epochs: Annotated[int, Field(ge=1, le=MAX_LOCAL_EPOCHS)] | None = None


class EarlyStoppingConfig(Section):
    enabled: bool = False
    # Watched metric: the server's held-out set (central_*) or the clients' local
    # validation splits (federated_*).
    metric: Literal["central_accuracy", "central_loss", "federated_accuracy", "federated_loss"] = (
        "central_accuracy"
    )
    patience: Annotated[int, Field(ge=1)] = 3
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0


# An MLflow tracking URI: a scheme (file, sqlite, http, https, databricks, ...), a colon, then no
# whitespace or control character (the URI is written to logs and to the run's config files).
_TRACKING_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s\x00-\x1f\x7f]+")
# user:password@ in an http(s) URI: the config is saved with the run, in plain text, and logged to MLflow.
_URI_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")
# The error type of a value that must not be quoted back in the message (it holds a secret).
_SECRET_INPUT = "secret_input"
# Control characters (newlines included) in an experiment name would forge log lines.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class MLflowConfig(Section):
    """Where `output.mlflow` logs each round's metrics, the resolved config and the final model."""

    # e.g. sqlite:///abs/path/mlflow.db, file:///abs/path/mlruns, http://mlflow.example:5000.
    # Credentials go in MLflow's own environment variables (MLFLOW_TRACKING_USERNAME, ...), not here.
    tracking_uri: Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]
    # A name in the tracking store, created if missing; never a path on this machine (on
    # Databricks it is a workspace path, which the server checks).
    experiment: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)] = "fedtune"

    @field_validator("tracking_uri")
    @classmethod
    def _uri_form(cls, value: str) -> str:
        if not _TRACKING_URI.fullmatch(value):
            raise ValueError("must be an MLflow tracking URI with a scheme and no spaces or control characters, e.g. "
                             "sqlite:///abs/path/mlflow.db, file:///abs/path/mlruns or http://host:5000")
        if _URI_CREDENTIALS.match(value):
            # A type of its own, so the error message does not repeat the password.
            raise PydanticCustomError(
                _SECRET_INPUT, "must not hold credentials (user:password@): the config is saved with the run; set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
        return value

    @field_validator("experiment")
    @classmethod
    def _experiment_form(cls, value: str) -> str:
        if _CONTROL_CHARACTERS.search(value) or not value.strip():
            raise ValueError("must be a name without control characters (newlines, tabs), and not blank")
        return value


# The output settings that only say how a run is watched: a crashed run resumes whatever they are.
MONITORING_KEYS = frozenset({"tensorboard", "mlflow"})


class OutputConfig(Section):
    # Each run writes to <dir>/<name>-<timestamp>/ ; relative to the directory the command runs in.
    dir: str = "runs"
    # Started again after a crash with the same config, a run continues from its last checkpoint
    # (an unfinished run folder under `dir` with the same config); false starts afresh.
    resume: bool = True
    # Each round's scalars as TensorBoard event files, in <run dir>/tensorboard/ (fedtune/monitoring.py).
    tensorboard: bool = False
    # The same per round, plus the config and the final model, to MLflow: needs pip install 'fedtune[mlflow]'.
    mlflow: MLflowConfig | None = None


class ExperimentConfig(Section):
    # Part of the run key clients name files with (name-<12 hex>, at most 200 characters).
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=128)] = "experiment"
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    personalization: PersonalizationConfig = PersonalizationConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _dp_sgd_fits(self) -> ExperimentConfig:
        if not self.privacy.dp_sgd.enabled:
            return self
        if self.strategy.name == "fedprox":
            # Opacus clips per-sample gradients of the loss; the proximal term's gradient would
            # bypass clipping and noise.
            raise ValueError("privacy.dp_sgd: cannot be combined with strategy fedprox; use any other strategy")
        if self.data.augment:
            raise ValueError("privacy.dp_sgd: data.augment is not supported with DP-SGD yet")
        return self

    def dp_batch_size(self) -> int | Literal["full"]:
        """privacy.dp_sgd.batch_size, `auto` resolved (it depends on the unfreeze schedule, which
        only the server knows): the number or "full" a client's DP-SGD batches hold."""
        size = self.privacy.dp_sgd.batch_size
        if size != "auto":
            return size
        head_only = self.train.trainable_blocks == 0 and not self.train.unfreeze
        enough_steps = self.federation.rounds * self.train.local_epochs >= FULL_BATCH_MIN_EPOCHS
        return "full" if head_only and enough_steps else self.train.batch_size

    @model_validator(mode="after")
    def _central_dp_fits(self) -> ExperimentConfig:
        central = self.privacy.central
        if not central.enabled:
            return self
        if self.strategy.name != "fedavg":
            # The noise calibrated to clipping_norm / clients is added to the model the strategy
            # returns; after a server optimiser step (FedAdam, FedYogi) or with FedProx's local
            # term that is no longer the sensitivity of what is released.
            raise ValueError(f"privacy.central: needs strategy fedavg, not {self.strategy.name}: the noise is "
                             "calibrated to a plain average of clipped updates")
        if central.clipping == "adaptive":
            stddev = central.clipped_count_stddev or self.federation.sampled_per_round / 20
            if 2 * stddev <= central.noise_multiplier:
                raise ValueError(
                    f"privacy.central.clipped_count_stddev: {stddev:g} leaves no noise for the updates: adaptive "
                    f"clipping needs it above noise_multiplier / 2 ({central.noise_multiplier / 2:g})"
                )
        if self.privacy.secure_aggregation.enabled:
            self._central_dp_fits_secure_aggregation()
        if self.strategy.bound.enabled is True:
            # The bound's median depends on the other clients' updates: one client could then change
            # how far every other update is clipped, and the calibrated sensitivity would not hold.
            raise ValueError("strategy.bound.enabled: the update bound cannot be combined with privacy.central, whose "
                             "clipping (privacy.central.clipping_norm) bounds every update; set it to auto or false")
        return self

    def _central_dp_fits_secure_aggregation(self) -> None:
        """Central DP on the SecAgg+ sum (fedtune/server/secure_aggregation.py): clients clip, the server adds noise."""
        central, secure = self.privacy.central, self.privacy.secure_aggregation
        if central.clipping != "client":
            # Server-side and adaptive clipping need each client's update (its norm), which the
            # server never sees under secure aggregation.
            raise ValueError(f"privacy.central.clipping: {central.clipping} cannot be combined with "
                             "privacy.secure_aggregation: the server sees only the sum of the updates, so each client "
                             "clips its own; set privacy.central.clipping to client")
        if central.clipping_norm > secure.clipping_range:
            # A clipped update's coordinates are at most clipping_norm; SecAgg+ clips each one to
            # clipping_range before quantising, which would bias the sum (clients refuse instead).
            raise ValueError(f"privacy.central.clipping_norm: {central.clipping_norm:g} exceeds "
                             f"privacy.secure_aggregation.clipping_range ({secure.clipping_range:g}): a clipped "
                             "update's coordinates can reach clipping_norm, and SecAgg+ would cut them; raise "
                             "clipping_range to at least clipping_norm")
        clients = self.federation.num_clients
        if clients * secure.quantization_range >= SECAGG_MODULUS:
            # Poisson sampling can draw every client: their modular sum must not wrap around.
            raise ValueError(f"privacy.secure_aggregation.quantization_range: {clients} clients (Poisson sampling can "
                             f"draw them all) x {secure.quantization_range} must stay below {SECAGG_MODULUS}; lower "
                             "quantization_range")
        ratio = self.secure_quantization_to_noise
        if ratio is not None and ratio > MAX_QUANTIZATION_TO_NOISE:
            raise ValueError(f"privacy.secure_aggregation.clipping_range: {secure.clipping_range:g} quantised in "
                             f"{secure.quantization_range} steps gives a rounding error up to {ratio:.2%} of the "
                             f"noise's standard deviation (more than {MAX_QUANTIZATION_TO_NOISE:.0%}); lower "
                             "clipping_range towards privacy.central.clipping_norm or raise quantization_range")

    @property
    def secure_quantization_to_noise(self) -> float | None:
        """With central DP on the SecAgg+ sum: the quantisation error's standard deviation over the noise's, at most.

        Each client's update is quantised in steps of 2 c / T (c the clipping_range, T the
        quantization_range) by stochastic rounding: an error of mean zero and variance at most
        (c / T)^2 per coordinate. The sum of n of them, divided by the expected count m, has a standard
        deviation of at most sqrt(n) c / (T m), against the noise's noise_multiplier x clipping_norm / m;
        n is at most num_clients. None unless both mechanisms are on.
        """
        central, secure = self.privacy.central, self.privacy.secure_aggregation
        if not (central.enabled and secure.enabled):
            return None
        return (math.sqrt(self.federation.num_clients) * secure.clipping_range
                / (secure.quantization_range * central.noise_multiplier * central.clipping_norm))

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> ExperimentConfig:
        secure = self.privacy.secure_aggregation
        if not secure.enabled:
            return self
        if self.strategy.name in ROBUST_STRATEGIES:
            raise ValueError(f"privacy.secure_aggregation: cannot be combined with strategy {self.strategy.name}: it "
                             "compares single updates, and the server sees only their sum")
        if self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(f"privacy.secure_aggregation: needs strategy fedavg or fedprox, not {self.strategy.name}: "
                             "the server optimisers are not applied to the securely aggregated average yet")
        if self.strategy.bound.enabled is True:
            raise ValueError("strategy.bound.enabled: the update bound cannot be combined with "
                             "privacy.secure_aggregation: the server sees only the sum of the updates (clients bound "
                             "their own with privacy.secure_aggregation.clipping_range); set it to auto or false")
        if self.federation.sampled_per_round < 2:
            raise ValueError("privacy.secure_aggregation: needs at least 2 clients per round; a sum of one update "
                             "hides nothing")
        return self

    @model_validator(mode="after")
    def _robust_strategy_fits(self) -> ExperimentConfig:
        strategy, sampled = self.strategy, self.federation.sampled_per_round
        f = strategy.num_malicious
        # Krum's score sums the distances to the n - f - 2 nearest updates; Bulyan selects
        # n - 2f with Krum and then trims 2f more: the published conditions for tolerating f.
        needed = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(strategy.name)
        if needed is not None and sampled < needed:
            rule = "4 x num_malicious + 3" if strategy.name == "bulyan" else "2 x num_malicious + 3"
            raise ValueError(
                f"strategy.num_malicious: {strategy.name} tolerating {f} hostile clients needs at least {needed} "
                f"clients per round ({rule}), but federation.clients_per_round gives {sampled}"
            )
        if strategy.name == "multikrum" and strategy.num_selected is not None and strategy.num_selected > sampled - f:
            raise ValueError(f"strategy.num_selected: multikrum can average at most clients per round - num_malicious "
                             f"= {sampled - f} updates, not {strategy.num_selected}")
        if strategy.name == "fedtrimmedavg" and int(strategy.trim_fraction * sampled) == 0:
            # Flower cuts int(fraction x n) updates at each end: zero would be a plain mean.
            raise ValueError(f"strategy.trim_fraction: {strategy.trim_fraction:g} of {sampled} clients per round cuts "
                             f"no update; at least {1 / sampled:.3g} is needed to cut one at each end")
        return self

    @model_validator(mode="after")
    def _personalization_fits(self) -> ExperimentConfig:
        personal = self.personalization
        if personal.method == "none":
            for option in ("fedbn_affine", "finetune_epochs"):
                if getattr(personal, option) not in (False, None):
                    raise ValueError(f"personalization.{option}: applies to method "
                                     f"{option.split('_')[0]}, not none")
            return self
        if personal.fedbn_affine and personal.method != "fedbn":
            raise ValueError(f"personalization.fedbn_affine: applies to method fedbn, not {personal.method}")
        if personal.finetune_epochs is not None and personal.method != "finetune":
            raise ValueError(f"personalization.finetune_epochs: applies to method finetune, not {personal.method}")
        if personal.method == "finetune" and self.privacy.dp_sgd.enabled:
            raise ValueError("personalization.method: finetune trains on each client's data outside DP-SGD, and the "
                             "accuracy it reports would carry that data out without noise")
        if personal.method == "fedbn" and self.privacy.freezes_statistics and not personal.fedbn_affine:
            raise ValueError("personalization.method: fedbn keeps BatchNorm statistics local, but under differential "
                             "privacy they stay frozen: nothing would be personal (set fedbn_affine: true)")
        if personal.method == "local_head" and self.train.trainable_blocks == 0 and not self.train.unfreeze:
            raise ValueError("personalization.method: local_head keeps the head local, and with trainable_blocks 0 "
                             "nothing else trains: no federation left (that is method local)")
        if personal.method == "local" and (self.privacy.central.enabled or self.privacy.secure_aggregation.enabled):
            raise ValueError("personalization.method: local sends nothing to aggregate: turn privacy.central and "
                             "privacy.secure_aggregation off")
        if self.early_stopping.enabled and self.early_stopping.metric.startswith("central_") \
                and personal.method in ("local_head", "local"):
            raise ValueError(f"early_stopping.metric: under personalization.method {personal.method} the server's "
                             "model keeps its initial head, so its central accuracy says nothing: watch a "
                             "federated_* metric")
        return self

    @model_validator(mode="after")
    def _early_stopping_metric_measured(self) -> ExperimentConfig:
        stopping = self.early_stopping
        if stopping.enabled and stopping.metric.startswith("federated_") and not self.federated_evaluation:
            why = "data.val_fraction is 0" if self.federation.evaluation.enabled else "federation.evaluation is off"
            raise ValueError(f"early_stopping.metric: {stopping.metric} is never measured ({why}, so no client "
                             "evaluates); watch a central_* metric, or turn federated evaluation on")
        return self

    @model_validator(mode="after")
    def _weights_file_exists(self) -> ExperimentConfig:
        # Checked here, not in ModelConfig: clients receive the model section but never the file.
        weights = self.model.weights
        if weights not in ("imagenet", "none") and not Path(weights).is_file():
            raise ValueError(f"model.weights: no weights file at {cut(weights)} (or use 'imagenet' or 'none')")
        return self

    @model_validator(mode="after")
    def _schedule_fits_rounds(self) -> ExperimentConfig:
        for step in self.train.unfreeze:
            if step.from_round > self.federation.rounds:
                raise ValueError(
                    f"train.unfreeze: from_round {step.from_round} is after the last round "
                    f"(federation.rounds = {self.federation.rounds})"
                )
        return self

    @property
    def federated_evaluation(self) -> bool:
        """Whether any round evaluates on the clients: it is on, and clients keep a validation split."""
        return self.federation.evaluation.enabled and self.data.val_fraction > 0

    @property
    def fewest_clients_to_train(self) -> int:
        """Fewest eligible clients a round can go ahead with: federation.min_clients, and at least 2 under
        SecAgg+ alone (a sum of one update hides nothing, and Flower's workflow halts on it). Under
        central DP a round may draw fewer: fedtune/server/round.py, train_securely, plays those."""
        secure_alone = self.privacy.secure_aggregation.enabled and not self.privacy.central.enabled
        return max(self.federation.min_clients, 2) if secure_alone else self.federation.min_clients

    @property
    def one_node_per_client(self) -> bool:
        """Whether a simulation gives each client a node of its own rather than a pool of nodes playing
        them (fedtune/server/transport.py, VirtualClients): under SecAgg+, whose client side takes its
        identity in the protocol from the node that receives the message
        (flwr/client/mod/secure_aggregation/secaggplus_mod.py:162 in Flower 1.41)."""
        return self.privacy.secure_aggregation.enabled

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def format_error(error: ValidationError) -> str:
    """One line per problem, each naming the dotted key and what is allowed."""
    lines = []
    for item in error.errors():
        key = ".".join(cut(str(part)) for part in item["loc"] if not str(part).startswith("function-after"))
        # pydantic appends the branch name of a union to the location; keep the user's key only.
        key = key.replace(".int", "").replace(".literal['all']", "")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        # The offending value helps when it is a scalar; a whole section would drown the message.
        scalar = not isinstance(item["input"], dict | list | tuple)
        quoted = scalar and item["type"] not in ("extra_forbidden", "missing", _SECRET_INPUT)
        value = f" (got {shown(item['input'])})" if quoted else ""
        lines.append(f"{key}: {message}{value}" if key else f"{message}{value}")
    return "; ".join(dict.fromkeys(lines))


def _parse_yaml(text: str, *, source: str) -> Any:
    try:
        return strict_yaml.load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {strict_yaml.describe_error(error)}") from None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `key.sub=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {shown(assignment)} is not of the form key=value")
    dotted, _, text = assignment.partition("=")
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {shown(assignment)} has an empty key")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{cut(dotted)}: {shown(key)} is a value, not a section")
        node = child
    node[keys[-1]] = _parse_yaml(text, source=f"--set {cut(dotted)}") if text.strip() else None


def parse_config(raw: Any, *, source: str = "config") -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, not {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {format_error(error)}") from None


def read_config_text(path: Path) -> str:
    """The text of an experiment file: at most MAX_CONFIG_BYTES, UTF-8. Raises ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KB; is it really an experiment file?")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is fine
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                          "save it as UTF-8") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment file. Raises ConfigError naming the key."""
    path = Path(path)
    raw = _parse_yaml(read_config_text(path), source=str(path))
    if raw is None:
        # Most likely the wrong file, or one whose contents were lost: running the whole default
        # experiment instead would hide that.
        raise ConfigError(f"{path}: the file is empty (or holds only comments); to run with every default "
                          "setting, write {} in it")
    if isinstance(raw, dict):
        for assignment in overrides:
            apply_override(raw, assignment)
    return parse_config(raw, source=str(path))


def config_from_json(text: str) -> ExperimentConfig:
    """Rebuild a config saved with a run (or sent in a message)."""
    try:
        return ExperimentConfig.model_validate_json(text)
    except ValidationError as error:
        raise ConfigError(f"saved config: {format_error(error)}") from None
