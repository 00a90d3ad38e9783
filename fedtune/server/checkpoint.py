"""Server checkpoints: what a killed server needs to resume its run as if it had never stopped.

One file per run folder, `checkpoint.safetensors`, rewritten atomically after every round: the
global model's trained part, the strategy's learned state (FedAdam's moments, the adaptive clipping
norm; central DP's generators, when reproducible), the random generators, early stopping, the
privacy bookkeeping and the clients that left at their privacy budget. Restored, the next round
starts from exactly the state the killed server had after its last completed round, so the run
ends with the same model as an uninterrupted one (under central DP, when it is reproducible).

Of the model, only the tensors of the stages trained so far are saved (the head alone, for feature
extraction: kilobytes, where the whole backbone is megabytes rewritten, hashed and synced every
round). Every other tensor is still the initial model's, which a resumed server builds again from
the same config and checks against the checkpoint's `model_hash` before loading the rest over it.
Checkpoints holding the whole model (fedtune before this) load the same way.

A SHA-256 over every tensor (name, dtype, shape, bytes) and the JSON state is stored with them and
checked on load: a flipped bit anywhere (one exponent bit turned a weight into 5.6e33) makes the
checkpoint refused, never used, and left as it is for the user to look at.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedtune.atomic import write_bytes_atomically
from fedtune.config import MONITORING_KEYS, ExperimentConfig, parse_config, shown
from fedtune.model_file import CONFIG_JSON
from fedtune.report import SUMMARY_JSON

log = logging.getLogger("fedtune.server")

CHECKPOINT_FILE = "checkpoint.safetensors"
_STATE = "fedtune.checkpoint"  # safetensors metadata key holding everything that is not a tensor
_CHECKSUM = "fedtune.checkpoint.sha256"  # metadata key: _digest of the tensors and the state
_FORMAT = 2  # 2: with _CHECKSUM
_WHAT_TO_DO = ("it was not used and is left as it is; move its run folder away to start afresh, or set "
               "output.resume=false")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and why."""


@dataclass
class RandomState:
    """The global generators the server draws from: `random` (Flower's client sampling), numpy's and
    torch's. Central DP's own generators are part of the strategy's state (fedtune/strategies/
    central_dp.py, CentralRandomness), saved only when reproducible."""

    python: list[Any]
    numpy: dict[str, Any]
    torch: torch.Tensor

    @classmethod
    def capture(cls) -> RandomState:
        name, keys, position, has_gauss, cached = np.random.get_state()
        return cls(
            python=_as_lists(random.getstate()),
            numpy={"name": name, "keys": [int(k) for k in keys], "position": int(position),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            torch=torch.get_rng_state(),
        )

    def restore(self) -> None:
        version, internal, gauss = self.python
        random.setstate((version, tuple(internal), gauss))
        n = self.numpy
        np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["position"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(self.torch)


@dataclass
class Checkpoint:
    """The server's state after `round` completed rounds."""

    round: int
    run_key: str  # names the run on clients' disks (their DP ledgers); kept across restarts
    model_hash: str  # of the initial model: a resumed run must start from the same one
    elapsed_seconds: float  # wall time of the run so far, over all the server's lives
    model: dict[str, torch.Tensor]  # the global model's tensors that training may have changed (or all of them)
    strategy_tensors: dict[str, np.ndarray]
    strategy_scalars: dict[str, Any]
    random_state: RandomState
    early_stopping: dict[str, Any]
    at_budget: list[int]  # clients that left at their privacy budget
    privacy: dict[str, Any]  # PrivacyReport's bookkeeping
    deliveries: dict[int, int] = field(default_factory=dict)  # node -> times the backbone was sent

    def save(self, run_dir: Path) -> Path:
        """Write run_dir/checkpoint.safetensors atomically: a kill leaves the previous one intact."""
        tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in self.model.items()}
        tensors |= {f"strategy/{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                    self.strategy_tensors.items()}
        tensors["random/torch"] = self.random_state.torch
        state = {
            "format": _FORMAT, "round": self.round, "run_key": self.run_key, "model_hash": self.model_hash,
            "elapsed_seconds": self.elapsed_seconds, "strategy_scalars": self.strategy_scalars,
            "random": {"python": self.random_state.python, "numpy": self.random_state.numpy},
            "early_stopping": self.early_stopping, "at_budget": self.at_budget, "privacy": self.privacy,
            "deliveries": {str(k): v for k, v in self.deliveries.items()},
        }
        state_text = json.dumps(state)
        data = save_tensors(tensors, metadata={_STATE: state_text, _CHECKSUM: _digest(tensors, state_text)})
        return write_bytes_atomically(run_dir / CHECKPOINT_FILE, data)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """The checkpoint at `path`, verified; CheckpointError naming the file if it cannot be used."""
        try:
            raw = path.read_bytes()
            tensors = load_tensors(raw)
            metadata = _metadata(raw)
            state_text = metadata[_STATE]
            state = json.loads(state_text)
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as error:
            problem = " ".join(str(error).split())[:200]
            raise CheckpointError(f"checkpoint {path} cannot be read ({problem}); {_WHAT_TO_DO}") from None
        checksum = metadata.get(_CHECKSUM)
        if checksum is None:
            written_by = state.get("format") if isinstance(state, dict) else None
            raise CheckpointError(f"checkpoint {path} has no checksum (format {shown(written_by)}; this fedtune "
                                  f"writes {_FORMAT}), so it cannot be verified; {_WHAT_TO_DO}")
        if checksum != _digest(tensors, state_text):
            raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match its checksum; "
                                  f"{_WHAT_TO_DO}")
        try:
            return cls._from_parts(state, tensors)
        except KeyError as error:
            raise CheckpointError(f"checkpoint {path} lacks {shown(error.args[0])}; {_WHAT_TO_DO}") from None
        except (TypeError, ValueError, AttributeError) as error:
            problem = " ".join(str(error).split())[:200]
            raise CheckpointError(f"checkpoint {path} holds a malformed value ({problem}); {_WHAT_TO_DO}") from None

    @classmethod
    def _from_parts(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Checkpoint:
        if state["format"] != _FORMAT:
            raise ValueError(f"format {shown(state['format'])}, this fedtune reads {_FORMAT}")
        return cls(
            round=int(state["round"]),
            run_key=str(state["run_key"]),
            model_hash=str(state["model_hash"]),
            elapsed_seconds=float(state["elapsed_seconds"]),
            model={k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")},
            strategy_tensors={k.removeprefix("strategy/"): v.numpy() for k, v in tensors.items()
                              if k.startswith("strategy/")},
            strategy_scalars=dict(state["strategy_scalars"]),
            random_state=RandomState(python=state["random"]["python"], numpy=state["random"]["numpy"],
                                     torch=tensors["random/torch"]),
            early_stopping=dict(state["early_stopping"]),
            at_budget=[int(n) for n in state["at_budget"]],
            privacy=dict(state["privacy"]),
            deliveries={int(k): int(v) for k, v in state["deliveries"].items()},
        )


def find_resumable(cfg: ExperimentConfig) -> Path | None:
    """The checkpoint of the latest unfinished run of this very config under cfg.output.dir, if any.

    Unfinished: it has a checkpoint but no summary.json (written when a run ends, however it ends).
    The same config: its config.json equals this one, so `--set` overrides count too; settings added
    since it was written count at their defaults, and how the run is watched (output.tensorboard,
    output.mlflow) does not count: switching TensorBoard on for a crashed run resumes it.
    """
    root = Path(cfg.output.dir)
    if not root.is_dir():
        return None
    wanted = _what_resuming_compares(json.loads(cfg.to_json()))
    candidates = []
    for checkpoint in root.glob(f"{cfg.name}-*/{CHECKPOINT_FILE}"):
        run_dir = checkpoint.parent
        if (run_dir / SUMMARY_JSON).exists():
            continue
        try:
            recorded = parse_config(json.loads((run_dir / CONFIG_JSON).read_text()), source=str(run_dir))
            same = _what_resuming_compares(json.loads(recorded.to_json())) == wanted
        except (OSError, ValueError):  # ConfigError is a ValueError: a config this fedtune cannot read
            same = False
        if same:
            candidates.append(checkpoint)
        else:
            log.info("not resuming %s: its config differs from this run's", run_dir)
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def _digest(tensors: dict[str, torch.Tensor], state_text: str) -> str:
    """SHA-256 of the state JSON and of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(state_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _metadata(raw: bytes) -> dict[str, str]:
    # safetensors' header: 8 bytes of little-endian length, then JSON with "__metadata__".
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length])["__metadata__"]


def _as_lists(value: Any) -> Any:
    """Tuples to lists, recursively: JSON's shape of random.getstate()."""
    return [_as_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _what_resuming_compares(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config without the settings that only say how a run is watched."""
    output = {key: value for key, value in config.get("output", {}).items() if key not in MONITORING_KEYS}
    return {**config, "output": output}
