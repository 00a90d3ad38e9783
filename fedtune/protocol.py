"""Parse-and-check of whatever a peer sends: each value becomes a typed, bounded one, or is refused with a reason.

It also defines the record the server sends every client, ClientSettings (versioned, typed);
the names of records and keys, and the reasons of error replies, are fedtune/messages.py.
Clients parse the server's queries and round instructions here; the server parses the clients'
answers to its queries here. Nothing deeper ever reads raw message content: a value that is not
of its exact form raises RefusedMessage, whose text names the field and the problem (with at most
a short excerpt of the offending value, never the whole of it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common import Scalar
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from pydantic import Field, ValidationError, model_validator
from torch import Tensor

from fedtune import messages as keys
from fedtune.config import (
    MAX_CLASSES,
    MAX_CLIENTS,
    MAX_DP_SCALE,
    MAX_PROXIMAL_MU,
    MAX_ROUNDS,
    MAX_SECAGG_SCALE,
    MAX_SEED,
    ConfigError,
    DataConfig,
    DPSGDConfig,
    ExperimentConfig,
    ModelConfig,
    PersonalizationConfig,
    Section,
    TrainConfig,
    format_error,
    shown,
)

# fedtune.params.state_hash: a sha256 hex digest, lowercase.
MODEL_HASH_FORM = re.compile(r"[0-9a-f]{64}")
# Stage names of the registered backbones: stem, blocks_3, features_12, encoder_norm, head ...
STAGE_NAME_FORM = re.compile(r"[A-Za-z0-9_]{1,64}")
MAX_SETTINGS_CHARS = 64 * 1024  # the settings JSON is about 300-3,000 characters
MAX_STAGES = 256  # the registered backbones have at most 20 stages
MAX_PARTITION_LABEL = 2**31 - 1
MAX_REASON_CHARS = 1_000  # of an error reply's reason, and of what the server logs of one
MAX_SECAGG_CONFIG_CHARS = 4 * MAX_SETTINGS_CHARS  # the train config, client settings inside, escaped once more
_EXCERPT_CHARS = 40
# The form of the client settings record; a node refuses any other (ClientSettings.version).
# 2: dp_sgd.batch_size arrives resolved (a number or "full", never "auto"); dp_sgd.reproducible.
SETTINGS_VERSION = 4  # 3: personalization; 4: train.adapter, train.lora

# Keys a round's config may carry: fedtune's own and those Flower's strategies add.
ROUND_CONFIG_KEYS = frozenset({
    keys.CLIENT_CONFIG, keys.MODEL_HASH, keys.TRAINABLE_STAGES,
    keys.SERVER_ROUND,  # every Flower strategy
    keys.PROXIMAL_MU,  # FedProx
    KEY_CLIPPING_NORM,  # central DP clipped on clients (read by Flower's fixedclipping_mod)
    keys.OWN_NOISE_STDDEV,  # central DP under SecAgg+, a client drawn alone
    keys.VIRTUAL_PARTITION, keys.VIRTUAL_CLIENTS,  # in a simulation, the client a node plays
})
QUERY_CONFIG_KEYS = frozenset({keys.MODEL_HASH, keys.VIRTUAL_PARTITION, keys.VIRTUAL_CLIENTS})


class ClientSettings(Section):
    """What a client needs to train, sent in every message: clients never read the experiment file.

    `version` names this record's form: a node refuses any other, with a reason that says the
    server and the node run different fedtune releases, rather than misreading a field.
    """

    version: Annotated[int, Field(ge=SETTINGS_VERSION, le=SETTINGS_VERSION)]  # strict: true is not 1
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)]
    num_clients: Annotated[int, Field(ge=1, le=MAX_CLIENTS)]
    num_classes: Annotated[int, Field(ge=2, le=MAX_CLASSES)]
    rounds: Annotated[int, Field(ge=1, le=MAX_ROUNDS)]  # planned rounds: DP-SGD calibrates its noise for all at once
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    dp_sgd: DPSGDConfig = DPSGDConfig()
    # BatchNorm running statistics stay at the initial model's values and do not travel.
    freeze_statistics: bool = False
    # What of the trainable part stays on the client (fedtune/params.py, personal_keys).
    personalization: PersonalizationConfig = PersonalizationConfig()
    # Names the run on the clients' disks (the DP-SGD ledger) and stays the same when a killed
    # server resumes the run; part of a file name (run-<key>.json), so no path separators, and short.
    run_key: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=200)] = "run"

    @model_validator(mode="after")
    def _dp_batch_size_resolved(self) -> ClientSettings:
        if self.dp_sgd.batch_size == "auto":
            raise ValueError("dp_sgd.batch_size: 'auto' must arrive resolved (a number or 'full'): the server "
                             "resolves it from the unfreeze schedule, which a node does not see")
        return self

    @classmethod
    def of(cls, cfg: ExperimentConfig, *, num_classes: int, run_key: str = "run") -> ClientSettings:
        return cls(
            version=SETTINGS_VERSION,
            run_key=run_key,
            seed=cfg.seed,
            num_clients=cfg.federation.num_clients,
            num_classes=num_classes,
            rounds=cfg.federation.rounds,
            model=cfg.model,
            data=cfg.data,
            # The server applies the unfreeze schedule (each round's message names its stages); a node
            # reads trainable_blocks only for where adapters sit: in the schedule's widest blocks.
            train=cfg.train.model_copy(update={"unfreeze": (), "trainable_blocks": cfg.train.widest_blocks}),
            # `auto` depends on the unfreeze schedule, which the server keeps: resolved here.
            dp_sgd=cfg.privacy.dp_sgd.model_copy(update={"batch_size": cfg.dp_batch_size()}),
            freeze_statistics=cfg.privacy.freezes_statistics,
            personalization=cfg.personalization,
        )

    def to_message(self) -> str:
        # Compact: this string rides along with every round's tensors.
        return self.model_dump_json(exclude_defaults=True)

    @classmethod
    def from_message(cls, text: str) -> ClientSettings:
        """The settings a server sent, checked exactly: strict types (no true for 1, no 2.0 for 2)
        and every bound above. `parse_settings` bounds the text's length before this."""
        try:
            return cls.model_validate_json(text, strict=True)
        except ValidationError as error:
            version = next((e for e in error.errors() if e["loc"][:1] == ("version",)), None)
            if version is not None:
                found = "no version" if version["type"] == "missing" else f"version {shown(version['input'])}"
                raise ConfigError(f"client settings from the server: {found}, but this node reads version "
                                  f"{SETTINGS_VERSION} only: the server and this node run different fedtune releases"
                                  ) from None
            raise ConfigError(f"client settings from the server: {format_error(error)}") from None


class RefusedMessage(ValueError):
    """A value from a peer that is not of its exact form: `field` names it, `problem` says what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def excerpt(value: object) -> str:
    """A short, printable excerpt of a peer's value, for error texts and log lines."""
    text = repr(value)
    return text if len(text) <= _EXCERPT_CHARS else f"{text[:_EXCERPT_CHARS]}... ({len(text)} characters)"


def error_reply(msg: Message, reason: str) -> Message:
    """An error reply to `msg`, its reason cut to MAX_REASON_CHARS."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason[:MAX_REASON_CHARS]), reply_to=msg)


def refusal(msg: Message, error: RefusedMessage) -> Message:
    """The error reply of a node that will not act on `msg`; the server logs its reason."""
    return error_reply(msg, f"{keys.REFUSED}: {error}")


# ---------------------------------------------------------------------------------------------
# Single values
# ---------------------------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return type(value).__name__


def parse_model_hash(value: object, *, field: str = keys.MODEL_HASH) -> str:
    """A model's content hash: 64 lowercase hex characters, as fedtune.params.state_hash gives it.

    It names a file in the node's cache, so nothing else (no '/', no '..') may pass.
    """
    if not isinstance(value, str):
        raise RefusedMessage(field, f"must be a string, got {_type_name(value)}")
    if not MODEL_HASH_FORM.fullmatch(value):
        raise RefusedMessage(field, f"must be 64 lowercase hex characters (a sha256 digest), got {excerpt(value)}")
    return value


def parse_server_round(value: object) -> int:
    if type(value) is not int:  # bool is an int subclass: True is not round 1
        raise RefusedMessage(keys.SERVER_ROUND, f"must be an integer, got {_type_name(value)}")
    if not 1 <= value <= MAX_ROUNDS:
        raise RefusedMessage(keys.SERVER_ROUND, f"must be between 1 and {MAX_ROUNDS}, got {excerpt(value)}")
    return value


def parse_number(value: object, field: str, *, low: float, high: float, low_inclusive: bool) -> float:
    """A finite int or float (not a bool) within the bounds."""
    if type(value) not in (int, float):
        raise RefusedMessage(field, f"must be a number, got {_type_name(value)}")
    number = float(value)  # type: ignore[arg-type]
    above_low = number >= low if low_inclusive else number > low
    if not (math.isfinite(number) and above_low and number <= high):
        bracket = "[" if low_inclusive else "("
        raise RefusedMessage(field, f"must be a finite number in {bracket}{low:g}, {high:g}], got {excerpt(value)}")
    return number


def parse_proximal_mu(value: object) -> float:
    """FedProx's weight of the proximal term."""
    return parse_number(value, keys.PROXIMAL_MU, low=0.0, high=MAX_PROXIMAL_MU, low_inclusive=True)


def parse_clipping_norm(value: object) -> float:
    """Central DP's clipping norm, which Flower's fixedclipping_mod applies to this node's update."""
    return parse_number(value, KEY_CLIPPING_NORM, low=0.0, high=MAX_DP_SCALE, low_inclusive=False)


def parse_own_noise(config: ConfigRecord) -> float:
    """The noise a client drawn alone under central DP and SecAgg+ adds to its clipped update: it
    comes with the clipping norm, and it may not be zero (the server would see the update itself)."""
    if KEY_CLIPPING_NORM not in config:
        raise RefusedMessage(keys.OWN_NOISE_STDDEV, f"without {KEY_CLIPPING_NORM}: only a clipped update is noised")
    return parse_number(config[keys.OWN_NOISE_STDDEV], keys.OWN_NOISE_STDDEV, low=0.0, high=MAX_DP_SCALE**2,
                        low_inclusive=False)


def parse_settings(value: object) -> ClientSettings:
    """The client settings JSON: bounded in length, then checked field by field (ClientSettings)."""
    if not isinstance(value, str):
        raise RefusedMessage(keys.CLIENT_CONFIG, f"must be a JSON string, got {_type_name(value)}")
    if len(value) > MAX_SETTINGS_CHARS:
        raise RefusedMessage(keys.CLIENT_CONFIG, f"is {len(value)} characters long, more than {MAX_SETTINGS_CHARS}")
    try:
        return ClientSettings.from_message(value)
    except ConfigError as error:
        raise RefusedMessage(keys.CLIENT_CONFIG, str(error)) from None


def parse_stage_names(value: object) -> tuple[str, ...]:
    """The trainable stages' names: a non-empty list of distinct names of the form of a stage."""
    if not isinstance(value, list) or not value:
        raise RefusedMessage(keys.TRAINABLE_STAGES, f"must be a non-empty list of stage names, got {excerpt(value)}")
    if len(value) > MAX_STAGES:
        raise RefusedMessage(keys.TRAINABLE_STAGES, f"names {len(value)} stages, more than {MAX_STAGES}")
    for name in value:
        if not isinstance(name, str) or not STAGE_NAME_FORM.fullmatch(name):
            raise RefusedMessage(keys.TRAINABLE_STAGES, f"{excerpt(name)} is not a stage name")
    if len(set(value)) != len(value):
        raise RefusedMessage(keys.TRAINABLE_STAGES, "names a stage twice")
    return tuple(value)


def check_stages_of(
    stages: Iterable[str], model_stages: Iterable[str], *, backbone: str, field: str = keys.TRAINABLE_STAGES
) -> None:
    """Every stage named (to train, or to give a learning-rate multiplier) must be a stage of the model."""
    known = list(model_stages)
    unknown = [stage for stage in stages if stage not in known]
    if unknown:
        raise RefusedMessage(field, f"{', '.join(map(excerpt, unknown[:3]))} is not a stage of {backbone} "
                                    f"(its stages: {', '.join(known)})")


def check_trainable_tensors(tensors: Mapping[str, Tensor], model_state: Mapping[str, Tensor]) -> None:
    """The round's tensors must have the dtype of the model's and finite values (keys and shapes are
    checked when they are loaded, by fedtune.params.load_tensors)."""
    for name, tensor in tensors.items():
        expected = model_state.get(name)
        if expected is None:
            continue  # an unexpected key: load_tensors names it
        if tensor.dtype != expected.dtype:
            raise RefusedMessage(keys.ARRAYS,
                                 f"{excerpt(name)} has dtype {tensor.dtype}, the model's is {expected.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RefusedMessage(keys.ARRAYS, f"{excerpt(name)} holds NaN or infinite values")


# ---------------------------------------------------------------------------------------------
# Whole messages, as a client receives them
# ---------------------------------------------------------------------------------------------


def _records(
    content: RecordDict,
    *,
    configs: frozenset[str],
    arrays: frozenset[str],
    optional_arrays: frozenset[str] = frozenset(),
) -> None:
    """The message holds exactly these records (and perhaps the optional arrays), and no others."""
    present = {
        "config": set(content.config_records), "array": set(content.array_records),
        "metric": set(content.metric_records),
    }
    expected = {"config": configs, "array": arrays, "metric": frozenset()}
    for kind, names in present.items():
        extra = names - expected[kind] - (optional_arrays if kind == "array" else frozenset())
        if extra:
            raise RefusedMessage("content", f"unexpected {kind} record {excerpt(sorted(extra)[0])}")
        missing = expected[kind] - names
        if missing:
            raise RefusedMessage(sorted(missing)[0], f"missing {kind} record")


def _config_keys(config: ConfigRecord, allowed: frozenset[str], required: Iterable[str]) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise RefusedMessage(keys.CONFIG, f"unknown key {excerpt(unknown[0])}"
                                          + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""))
    for key in required:
        if key not in config:
            raise RefusedMessage(key, "missing")


@dataclass(frozen=True)
class VirtualClient:
    """Which client of a simulated federation a simulation node plays for one message."""

    partition: int
    clients: int


def parse_virtual_client(config: ConfigRecord) -> VirtualClient | None:
    """The virtual client a message's config names, if it names one: exactly a partition in
    0..clients-1 of at most MAX_CLIENTS clients. Whether this node may play one is the node's to
    decide (fedtune/client/task.py, NodeIdentity.playing)."""
    if keys.VIRTUAL_PARTITION not in config and keys.VIRTUAL_CLIENTS not in config:
        return None
    values = {}
    for key in (keys.VIRTUAL_PARTITION, keys.VIRTUAL_CLIENTS):
        if key not in config:
            raise RefusedMessage(key, "missing")
        value = config[key]
        if type(value) is not int:
            raise RefusedMessage(key, f"must be an integer, got {_type_name(value)}")
        values[key] = value
    clients, partition = values[keys.VIRTUAL_CLIENTS], values[keys.VIRTUAL_PARTITION]
    if not 1 <= clients <= MAX_CLIENTS:
        raise RefusedMessage(keys.VIRTUAL_CLIENTS, f"must be in [1, {MAX_CLIENTS}], got {clients}")
    if not 0 <= partition < clients:
        raise RefusedMessage(keys.VIRTUAL_PARTITION, f"must be in [0, {clients - 1}], got {partition}")
    return VirtualClient(partition=partition, clients=clients)


@dataclass(frozen=True)
class ModelQuery:
    """The server asks whether this node caches a model, and may send the model with the question.

    Without a hash, the query only asks the node to answer (a simulation's warm-up, sent before
    the server knows its model): it answers that it holds no model.
    """

    model_hash: str | None
    backbone: ArrayRecord | None
    virtual: VirtualClient | None = None


def parse_model_query(content: RecordDict) -> ModelQuery:
    _records(content, configs=frozenset({keys.CONFIG}), arrays=frozenset(), optional_arrays=frozenset({keys.BACKBONE}))
    config = content.config_records[keys.CONFIG]
    _config_keys(config, QUERY_CONFIG_KEYS, required=[])
    backbone = content.array_records.get(keys.BACKBONE)
    if keys.MODEL_HASH not in config and backbone is not None:
        raise RefusedMessage(keys.MODEL_HASH, "missing: a backbone comes with the hash it is checked against")
    model_hash = parse_model_hash(config[keys.MODEL_HASH]) if keys.MODEL_HASH in config else None
    return ModelQuery(model_hash, backbone, parse_virtual_client(config))


@dataclass(frozen=True)
class RoundInstruction:
    """A train or evaluate message: the settings, which model, which stages train, and their tensors."""

    settings: ClientSettings
    model_hash: str
    stages: tuple[str, ...]
    server_round: int
    proximal_mu: float
    arrays: ArrayRecord
    virtual: VirtualClient | None = None


def parse_round_instruction(content: RecordDict) -> RoundInstruction:
    _records(content, configs=frozenset({keys.CONFIG}), arrays=frozenset({keys.ARRAYS}))
    config = content.config_records[keys.CONFIG]
    _config_keys(config, ROUND_CONFIG_KEYS,
                 required=[keys.CLIENT_CONFIG, keys.MODEL_HASH, keys.TRAINABLE_STAGES, keys.SERVER_ROUND])
    if KEY_CLIPPING_NORM in config:
        parse_clipping_norm(config[KEY_CLIPPING_NORM])  # applied by Flower's mod; checked all the same
    if keys.OWN_NOISE_STDDEV in config:
        parse_own_noise(config)  # applied by fedtune/client/app.py's mod; checked all the same
    return RoundInstruction(
        settings=parse_settings(config[keys.CLIENT_CONFIG]),
        model_hash=parse_model_hash(config[keys.MODEL_HASH]),
        stages=parse_stage_names(config[keys.TRAINABLE_STAGES]),
        server_round=parse_server_round(config[keys.SERVER_ROUND]),
        proximal_mu=parse_proximal_mu(config[keys.PROXIMAL_MU]) if keys.PROXIMAL_MU in config else 0.0,
        arrays=content.array_records[keys.ARRAYS],
        virtual=parse_virtual_client(config),
    )


# ---------------------------------------------------------------------------------------------
# Under SecAgg+: fedtune's entries of the legacy FitIns config, as the server writes them and a client reads them
# ---------------------------------------------------------------------------------------------


def encode_secure_fit_config(
    config: ConfigRecord, array_keys: Sequence[str], *, clipping_range: float, max_weight: float
) -> dict[str, Scalar]:
    """The legacy FitIns config that carries fedtune's train config and the tensor order."""
    try:
        fedtune_config = json.dumps(dict(config))
    except TypeError as err:  # bytes values: fedtune never sends any, but say so if one appears
        raise TypeError(f"a train config entry cannot travel under secure aggregation: {err}") from err
    return {
        keys.SECAGG_CONFIG: fedtune_config,
        keys.SECAGG_ARRAY_KEYS: json.dumps(list(array_keys)),
        keys.SECAGG_CLIPPING_RANGE: float(clipping_range),
        keys.SECAGG_MAX_WEIGHT: float(max_weight),
    }


@dataclass(frozen=True)
class SecureFitConfig:
    """fedtune's train config, the legacy tensors' names in order, and the bounds the update must fit."""

    config: ConfigRecord
    array_keys: list[str]
    clipping_range: float
    max_weight: float


def _json_entry(fit_config: ConfigRecord, key: str) -> object:
    """A JSON text entry of the legacy FitIns config, bounded before it is parsed."""
    text = fit_config.get(key)
    if not isinstance(text, str):
        raise RefusedMessage(key, f"must be a JSON string, got {_type_name(text)}")
    if len(text) > MAX_SECAGG_CONFIG_CHARS:
        raise RefusedMessage(key, f"is {len(text)} characters long, more than {MAX_SECAGG_CONFIG_CHARS}")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:  # RecursionError: nested too deep
        raise RefusedMessage(key, f"not valid JSON ({type(error).__name__})") from None


def parse_secure_fit_config(fit_config: ConfigRecord) -> SecureFitConfig:
    """fedtune's entries of a legacy FitIns config, each of its exact form, or RefusedMessage.

    The train config inside is checked as far as a ConfigRecord's value types here; the train
    handler parses it like any round instruction (parse_round_instruction).
    """
    entries = _json_entry(fit_config, keys.SECAGG_CONFIG)
    if not isinstance(entries, dict):
        raise RefusedMessage(keys.SECAGG_CONFIG, f"must hold a JSON object, got {_type_name(entries)}")
    try:
        config = ConfigRecord(entries)  # Flower's own check of the value types
    except (TypeError, ValueError) as error:
        raise RefusedMessage(keys.SECAGG_CONFIG, excerpt(str(error))) from None
    names = _json_entry(fit_config, keys.SECAGG_ARRAY_KEYS)
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise RefusedMessage(keys.SECAGG_ARRAY_KEYS, "must hold a JSON list of tensor names")
    if len(set(names)) != len(names):
        raise RefusedMessage(keys.SECAGG_ARRAY_KEYS, "names a tensor twice")
    return SecureFitConfig(
        config=config,
        array_keys=names,
        clipping_range=parse_number(fit_config.get(keys.SECAGG_CLIPPING_RANGE), keys.SECAGG_CLIPPING_RANGE,
                                    low=0.0, high=MAX_SECAGG_SCALE, low_inclusive=False),
        max_weight=parse_number(fit_config.get(keys.SECAGG_MAX_WEIGHT), keys.SECAGG_MAX_WEIGHT,
                                low=0.0, high=MAX_SECAGG_SCALE, low_inclusive=False),
    )


# ---------------------------------------------------------------------------------------------
# Replies, as the server receives them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryAnswer:
    """A node's answer to the model query. `partition` is only a label for log lines; `problems`
    says what in the answer was not of its form (that part is ignored)."""

    has_model: bool
    partition: int | None
    problems: tuple[str, ...] = ()


def parse_query_answer(reply: Message) -> QueryAnswer:
    """What a node answered to the model query; anything malformed counts as "does not have it"."""
    metrics = reply.content.metric_records.get(keys.METRICS)
    if metrics is None:
        return QueryAnswer(has_model=False, partition=None, problems=(f"no {keys.METRICS!r} record",))
    problems = []
    has_model = metrics.get(keys.HAS_MODEL)
    well_formed = type(has_model) is int and has_model in (0, 1)
    if not well_formed:
        problems.append(f"{keys.HAS_MODEL} must be 0 or 1, got {excerpt(has_model)}")
    label = metrics.get(keys.PARTITION)
    partition = label if type(label) is int and 0 <= label <= MAX_PARTITION_LABEL else None
    if partition is None and label is not None:
        problems.append(f"{keys.PARTITION} must be an integer in [0, {MAX_PARTITION_LABEL}], got {excerpt(label)}")
    return QueryAnswer(has_model=well_formed and has_model == 1, partition=partition, problems=tuple(problems))


def says_model_missing(reply: Message) -> bool:
    """Whether a node's reply says it lacks the model (never received, deleted, or found damaged)."""
    return reply.has_error() and (reply.error.reason or "").startswith(keys.MODEL_MISSING)
