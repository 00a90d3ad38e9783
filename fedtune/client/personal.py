"""A client's personal tensors: what personalization keeps on the node, trains there and never sends.

Which tensors are personal is fedtune/params.py's `personal_keys` (config.py's PersonalizationConfig).
They are stored per run (the server's run key, as the DP ledger: a server that resumes the run
keeps it) under the client's own state folder, one safetensors file per round that trained it.
The last KEEP_ROUNDS are kept: a server resumed from an earlier checkpoint replays a round from the
state this client had before that round, and a replayed round drops the later files, which
belong to rounds the server no longer has.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedtune.atomic import replace_atomically
from fedtune.backbones import StagedModel
from fedtune.params import stage_of, stage_state

log = logging.getLogger("fedtune.client")

KEEP_ROUNDS = 3
_FILE = re.compile(r"round-(\d{1,9})\.safetensors")


class PersonalStore:
    """One client's personal tensors of one run, on its own disk."""

    def __init__(self, state_root: Path, run_key: str) -> None:
        # run_key has the form ClientSettings allows (letters, digits, _ . -): one folder name.
        self.folder = state_root / "personal" / f"run-{run_key}"

    def _saved(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        return sorted((int(match.group(1)), path) for path in self.folder.iterdir()
                      if (match := _FILE.fullmatch(path.name)) is not None)

    def load(self, *, before_round: int) -> dict[str, Tensor]:
        """The tensors the latest round before `before_round` saved; {} before any. A damaged file is
        skipped with a warning naming it, and the one before it is read."""
        for server_round, path in reversed(self._saved()):
            if server_round >= before_round:
                continue
            try:
                return load_file(path)
            except (OSError, SafetensorError, ValueError) as error:
                log.warning("personal tensors %s are unreadable (%s); reading the round before", path, error)
        return {}

    def save(self, server_round: int, tensors: Mapping[str, Tensor]) -> Path:
        """This round's tensors, written atomically; older files past KEEP_ROUNDS and any of later rounds
        (a replay after the server resumed) are removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"round-{server_round}.safetensors"
        plain = {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}
        replace_atomically(path, lambda tmp: save_file(plain, str(tmp)))
        kept = [number for number, _ in self._saved() if number <= server_round][-KEEP_ROUNDS:]
        for number, old in self._saved():
            if number not in kept:
                old.unlink(missing_ok=True)
        return path


def apply_personal(model: StagedModel, stored: Mapping[str, Tensor], keys: Iterable[str]) -> None:
    """Copy the stored personal tensors of `keys` into the model, in place; keys not stored keep the global
    model's values (a stage personal from this round on). A stored tensor whose shape or dtype is not
    the model's is left out with a warning."""
    wanted = [key for key in keys if key in stored]
    state = stage_state(model, {stage_of(key) for key in wanted})
    with torch.no_grad():  # copy_ moves each tensor's version counter: the resident model restores them
        for key in wanted:
            target, value = state.get(key), stored[key]
            if target is None or target.shape != value.shape or target.dtype != value.dtype:
                log.warning("personal tensor %s does not fit the model (%s %s): the global value is used", key,
                            tuple(value.shape), value.dtype)
                continue
            target.copy_(value)


def personal_state(model: StagedModel, keys: Iterable[str]) -> dict[str, Tensor]:
    """The model's current values of `keys`, on the CPU."""
    keys = list(keys)
    state = stage_state(model, {stage_of(key) for key in keys})
    return {key: state[key].detach().cpu().clone() for key in keys}
