"""The ClientApp: thin Flower handlers around plain-PyTorch local training and evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from torch.utils.data import Dataset

from fedtune import messages as keys
from fedtune import protocol
from fedtune.backbones import StagedModel
from fedtune.client.cache import CacheFull, ModelNotCached
from fedtune.client.personal import PersonalStore, apply_personal, personal_state
from fedtune.client.privacy import LedgerStore, train_private_round, within_node_budget
from fedtune.client.secure_aggregation import secure_aggregation_mod
from fedtune.client.statistics import answer_statistics_query
from fedtune.client.task import NodeIdentity, local_data, model_inputs, restored_model
from fedtune.engine import evaluate, resolve_device, train_one_round
from fedtune.logs import setup_logging
from fedtune.params import personal_keys, trainable_state_dict
from fedtune.protocol import ClientSettings, RefusedMessage, RoundInstruction

log = logging.getLogger("fedtune.client")


def _client_side_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixedclipping_mod on the train messages of runs with central DP clipped on clients.

    The mod fails on any message without a clipping norm, so it must not see the others; and it
    applies the norm as it comes, so the norm is checked first. Under SecAgg+, a client that the
    Poisson draw left alone in its round also adds the round's noise to its clipped update
    (keys.OWN_NOISE_STDDEV): there is no sum to hide it in, and the server then sees only what
    the round releases.
    """
    config = msg.content.config_records.get(keys.CONFIG)
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and KEY_CLIPPING_NORM in config:
        try:
            protocol.parse_clipping_norm(config[KEY_CLIPPING_NORM])
            own_noise = protocol.parse_own_noise(config) if keys.OWN_NOISE_STDDEV in config else None
        except RefusedMessage as error:
            return _refuse(msg, error)
        reply = fixedclipping_mod(msg, context, call_next)
        if own_noise is None or reply.has_error():
            return reply
        return _with_own_noise(reply, msg.content.array_records[keys.ARRAYS], own_noise)
    return call_next(msg, context)


def _with_own_noise(reply: Message, sent: ArrayRecord, stddev: float) -> Message:
    """`reply` with Gaussian noise of `stddev` added to each trained tensor's update.

    The noise comes from the operating system's entropy, not from the run's seed: the server, which
    knows the seed, must not be able to take it off again.
    """
    generator = np.random.default_rng()
    trained = reply.content.array_records[keys.ARRAYS]
    noised = {}
    for name, array in trained.items():
        values = array.numpy()
        if name not in sent or not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"central DP: cannot add noise to {name!r}: not a float tensor the server sent")
        noised[name] = Array(np.asarray(values + generator.normal(0.0, stddev, values.shape).astype(values.dtype)))
    reply.content.array_records[keys.ARRAYS] = ArrayRecord(noised)
    return reply


def _log_lines_once(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """This process's log lines printed once: a virtual client's Ray worker, or a node's ClientApp process,
    imports Opacus, whose logging.basicConfig would repeat every line (fedtune/logs.py)."""
    setup_logging()
    return call_next(msg, context)


# SecAgg+ outermost after the logging: it turns its legacy-layout train messages into fedtune's
# before the rest see them.
app = ClientApp(mods=[_log_lines_once, secure_aggregation_mod, _client_side_clipping])


def _refuse(msg: Message, error: RefusedMessage) -> Message:
    reply = protocol.refusal(msg, error)
    log.warning("refused a %s message from the server: %s", msg.metadata.message_type,
                (reply.error.reason or "").removeprefix(f"{keys.REFUSED}: "))  # as cut for the reply
    return reply


def _answer(msg: Message, handle: Callable[[], Message]) -> Message:
    """The handler's reply, or an error reply the server recognises: a refusal (naming the field and
    the problem), the model missing from the cache (the server sends it again), or a full cache."""
    try:
        return handle()
    except RefusedMessage as error:
        return _refuse(msg, error)
    except ModelNotCached as error:
        log.warning("the model of this round is not cached here: %s", error)
        return protocol.error_reply(msg, f"{keys.MODEL_MISSING}: {error}")
    except CacheFull as error:
        log.warning("%s", error)
        return protocol.error_reply(msg, str(error))


@dataclass(frozen=True)
class _LocalRound:
    """Everything a handler needs: the round's global model and what to feed its trainable part."""

    settings: ClientSettings
    node: NodeIdentity
    stages: list[str]
    model: StagedModel
    inputs: Dataset
    start: int  # index of the stage `inputs` feed (above a cached frozen prefix)
    device: torch.device
    personal: frozenset[str]  # the keys of `stages` personalization keeps here (fedtune/client/personal.py)
    # What feeds the trainable part for the other split too, and from which stage (personalization
    # finetune trains on the training split inside an evaluate message).
    inputs_of: Callable[[Literal["train", "validation"]], tuple[Dataset, int]]

    @property
    def store(self) -> PersonalStore:
        return PersonalStore(self.node.client_state_root, self.settings.run_key)

    def make_personal(self, *, before_round: int) -> dict[str, torch.Tensor]:
        """The model with this client's own personal tensors, those the latest round before `before_round`
        saved (the global model's values for any not saved yet); returns what was stored."""
        if not self.personal:
            return {}
        stored = self.store.load(before_round=before_round)
        apply_personal(self.model, stored, self.personal)
        return stored


@contextmanager
def _local_round(
    instruction: RoundInstruction, context: Context, *, split: Literal["train", "validation"]
) -> Iterator[_LocalRound]:
    """The round, for the block: its model is this process's resident one (fedtune/client/task.py)."""
    settings = instruction.settings
    node = NodeIdentity.from_node_config(dict(context.node_config)).playing(instruction.virtual, settings.num_clients)
    stages = list(instruction.stages)
    try:
        trainable = instruction.arrays.to_torch_state_dict()
    except Exception as error:  # Flower's conversion of arrays it could not make tensors of
        raise RefusedMessage(keys.ARRAYS, f"not tensors: {protocol.excerpt(str(error))}") from None
    models = node.model_cache()
    device = resolve_device(settings.train.device)
    with restored_model(settings, model_hash=instruction.model_hash, trainable=trainable, stages=stages,
                        cache=models, device=device) as model:
        data = local_data(settings, node)

        def inputs_of(part: Literal["train", "validation"]) -> tuple[Dataset, int]:
            return model_inputs(
                model,
                data.train if part == "train" else data.validation,
                identity=data.train_identity if part == "train" else data.validation_identity,
                stages=stages,
                model_hash=instruction.model_hash,
                augmented=settings.data.augment and part == "train",
                cache=node.feature_cache(),
                device=device,
                in_use=[models.path(instruction.model_hash)],
            )

        inputs, start = inputs_of(split)
        yield _LocalRound(settings, node, stages, model, inputs, start, device,
                          personal_keys(model, stages, settings.personalization), inputs_of)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answers whether the model with this hash is cached here, storing it first if the message carries it."""
    return _answer(msg, lambda: _query(msg, context))


def _query(msg: Message, context: Context) -> Message:
    question = protocol.parse_model_query(msg.content)
    node = NodeIdentity.from_node_config(dict(context.node_config)).playing(question.virtual)
    cache = node.model_cache()
    if question.backbone is not None and question.model_hash is not None:  # (the protocol pairs them)
        try:
            tensors = question.backbone.to_torch_state_dict()
        except Exception as error:  # Flower's conversion of arrays it could not make tensors of
            raise RefusedMessage(keys.BACKBONE, f"not tensors: {protocol.excerpt(str(error))}") from None
        try:
            cache.store(question.model_hash, tensors)
        except ValueError as error:  # not the model the hash announces
            raise RefusedMessage(keys.BACKBONE, str(error)) from None
    held = question.model_hash is not None and cache.has(question.model_hash)
    answer: dict[str, int | float | list[int] | list[float]] = {
        keys.HAS_MODEL: int(held), keys.PARTITION: node.partition_id}
    return Message(RecordDict({keys.METRICS: MetricRecord(answer)}), reply_to=msg)


@app.query(keys.STATISTICS)
def statistics(msg: Message, context: Context) -> Message:
    """`fedtune select`: each candidate's feature statistics on this node's training split
    (fedtune/client/statistics.py)."""
    return _answer(msg, lambda: answer_statistics_query(msg, context))


def run_training(msg: Message, context: Context) -> tuple[Message, StagedModel]:
    """Local training on this node's partition; returns the reply and the locally trained model.

    The model is this process's resident one (fedtune/client/resident.py): the next message this
    process handles puts it back to the cached model, so read it before then.
    Raises RefusedMessage for a message not of its exact form, ModelNotCached if the model is not here.
    """
    instruction = protocol.parse_round_instruction(msg.content)
    with _local_round(instruction, context, split="train") as local:
        stored = local.make_personal(before_round=instruction.server_round)
        reply = _train(msg, instruction, local, stored)
    return reply, local.model


def _train(msg: Message, instruction: RoundInstruction, local: _LocalRound, stored: dict[str, torch.Tensor]
           ) -> Message:
    """Local training; `stored`: this client's personal tensors it started from (kept beside the new ones)."""
    settings, node = local.settings, local.node
    torch.manual_seed(settings.seed + node.partition_id)
    server_round = instruction.server_round
    seed = settings.seed * 1000 + server_round * 100 + node.partition_id
    extra: dict[str, float] = {}
    dp = within_node_budget(settings.dp_sgd, max_epsilon=node.max_epsilon, max_delta=node.max_delta)
    if dp.enabled and not settings.freeze_statistics:
        # BatchNorm running statistics mix a batch's samples: sent back, they would bypass the noise.
        raise RefusedMessage("freeze_statistics", "DP-SGD needs BatchNorm statistics kept frozen and at home; "
                                                  "the server's settings would send them back")
    if dp.enabled:
        ledgers = LedgerStore(node.client_state_root, settings.run_key)
        ledger = ledgers.load()
        result, epsilon = train_private_round(
            local.model, local.inputs, stages=local.stages, cfg=settings.train, dp=dp,
            ledger=ledger, planned_rounds=settings.rounds, start=local.start, seed=seed, device=local.device,
        )
        ledgers.save(ledger)
        extra = {keys.EPSILON: epsilon, keys.NOISE_MULTIPLIER: float(ledger.noise_multiplier or 0.0),
                 keys.SAMPLE_RATE: float(ledger.sample_rate or 0.0)}
    else:
        result = train_one_round(
            local.model,
            local.inputs,
            stages=local.stages,
            cfg=settings.train,
            start=local.start,
            proximal_mu=instruction.proximal_mu,
            freeze_statistics=settings.freeze_statistics,
            seed=seed,
            device=local.device,
        )
    log.info("partition %d round %d: loss %.4f acc %.3f on %d examples",
             node.partition_id, server_round, result.loss, result.accuracy, result.num_examples)
    metrics = MetricRecord(
        {keys.NUM_EXAMPLES: result.num_examples, "train_loss": result.loss, "train_accuracy": result.accuracy,
         **extra}
    )
    if local.personal:  # kept here, for this client's next round and its evaluation; never in the reply
        local.store.save(server_round, stored | personal_state(local.model, local.personal))
    # trainable_state_dict copies to the CPU: the model itself stays on its device for the next message.
    arrays = ArrayRecord(trainable_state_dict(local.model, local.stages, statistics=not settings.freeze_statistics,
                                              personalization=settings.personalization))
    return Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, lambda: run_training(msg, context)[0])


@app.evaluate()
def evaluate_locally(msg: Message, context: Context) -> Message:
    """The global model on this node's local validation split."""
    return _answer(msg, lambda: _evaluate(msg, context))


def _fine_tune(local: _LocalRound, instruction: RoundInstruction) -> None:
    """personalization finetune: the global model trained on this client's training split for
    finetune_epochs, in place (the resident model is put back at the next message); nothing kept."""
    settings = local.settings
    inputs, start = local.inputs_of("train")
    epochs = settings.personalization.finetune_epochs or 1
    cfg = settings.train.model_copy(update={"local_epochs": epochs})
    train_one_round(local.model, inputs, stages=local.stages, cfg=cfg, start=start,
                    freeze_statistics=settings.freeze_statistics,
                    seed=settings.seed * 1000 + instruction.server_round * 100 + local.node.partition_id,
                    device=local.device)


def _evaluate(msg: Message, context: Context) -> Message:
    """The global model's loss and accuracy; under personalization, this client's own model's too (the
    global one with its personal tensors, as its latest training round left them)."""
    instruction = protocol.parse_round_instruction(msg.content)
    with _local_round(instruction, context, split="validation") as local:
        result = evaluate(local.model, local.inputs, start=local.start, device=local.device)
        if not result.num_examples:
            raise ValueError("this node has no local validation examples (raise data.val_fraction)")
        metrics = MetricRecord({keys.NUM_EXAMPLES: result.num_examples, "loss": result.loss,
                                "accuracy": result.accuracy})
        if local.settings.personalization.method != "none":
            if local.settings.personalization.method == "finetune":
                _fine_tune(local, instruction)
            else:
                local.make_personal(before_round=instruction.server_round + 1)
            own = evaluate(local.model, local.inputs, start=local.start, device=local.device)
            metrics[keys.PERSONAL_LOSS], metrics[keys.PERSONAL_ACCURACY] = own.loss, own.accuracy
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)
