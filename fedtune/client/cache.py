"""A node's disk cache: verified full models by content hash, checksummed frozen-prefix features, under one size cap.

Both kinds of entry count against one cap (`cache-max-gb` in the node config, else the
FEDTUNE_CACHE_MAX_GB environment variable, else DEFAULT_CACHE_MAX_GB). Writing an entry first
evicts the least recently used ones (loading an entry marks it used, to within a minute), never
the entry being written nor the model the round is using; an entry that cannot fit even then is
refused (CacheFull). A process counts the bytes it wrote rather than scanning the cache for every
write (`RESCAN_S`). Every entry is checked when it is read: a model must hash to its name, features to
the checksum stored beside them. A damaged entry is logged naming its file, removed, and never used.
A process that keeps a verified model in memory (fedtune/client/resident.py) reads its file again
only when the file's signature (`FileSignature`) has changed since the read it verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save_file
from torch import Tensor
from torch.utils.data import TensorDataset

from fedtune.atomic import replace_atomically
from fedtune.params import num_bytes, state_hash
from fedtune.protocol import MODEL_HASH_FORM

log = logging.getLogger("fedtune.client")

CACHE_ENV = "FEDTUNE_CACHE_DIR"
CACHE_MAX_ENV = "FEDTUNE_CACHE_MAX_GB"
DEFAULT_CACHE_MAX_GB = 10.0  # about 30 ViT-B/16 or 200 ResNet-18 backbones
# How precisely an entry's last use is kept (its modification time), in seconds: eviction goes by it.
USE_RESOLUTION_S = 60.0
_GB = 1024**3
_ENTRY_SUFFIX = ".safetensors"
_FEATURES_FORMAT = "fedtune.features.v1"


def default_cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedtune")


@dataclass(frozen=True)
class FileSignature:
    """What any write to a file, or its replacement, changes: its identity, size and timestamps.

    A change within one tick of the file system's clock, of the same size, leaves it as it was
    (kernels stamp files with a coarse clock, a few milliseconds): whoever relies on it keeps the
    content it verified and never reads the file without verifying it again.
    """

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileSignature:
        stat = path.stat()
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class CacheFull(OSError):
    """An entry larger than all the room the cache's cap allows."""


class ModelNotCached(LookupError):
    """The model a message names is not in this node's cache (never sent, deleted, or damaged and removed)."""


# Bytes each cache holds as this process last counted them (a scan of its folders), plus what the
# process wrote since. A write scans the folders again only when that count says the cap may be
# reached, or the count is older than RESCAN_S: the shared cache of a simulation's virtual clients
# holds two feature entries per client, and a scan for every write grew with the federation. Other
# processes sharing a cache write too: between two scans of this one, the cache can go over its
# cap by what they wrote.
RESCAN_S = 30.0
_counted: dict[Path, tuple[float, int]] = {}  # node_root -> (monotonic time of the scan, bytes)
_counted_lock = threading.Lock()


def _evict_for(incoming: int, *, node_root: Path, max_bytes: int, replacing: Path, protected: Iterable[Path]) -> None:
    """Remove the least recently used entries until `incoming` more bytes (the entry at `replacing`,
    new or written again) fit under `max_bytes`; `protected` entries stay."""
    now = time.monotonic()
    with _counted_lock:
        scanned_at, counted = _counted.get(node_root, (-math.inf, 0))
        if now - scanned_at < RESCAN_S and counted + incoming <= max_bytes:
            _counted[node_root] = (scanned_at, counted + incoming)
            return
    protected = {path.resolve() for path in protected}
    entries = []
    for folder in (node_root / ModelCache.FOLDER, node_root / FeatureCache.FOLDER):
        for path in folder.glob(f"*{_ENTRY_SUFFIX}") if folder.is_dir() else ():
            if path == replacing:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed meanwhile by another process of this node
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
    kept = sum(size for _, size, path in entries if path.resolve() in protected)
    if kept + incoming > max_bytes:
        raise CacheFull(
            f"an entry of {incoming / _GB:.2f} GB does not fit under this node's cache cap of "
            f"{max_bytes / _GB:.2f} GB ({kept / _GB:.2f} GB are in use); raise it with cache-max-gb in the node "
            f"config or {CACHE_MAX_ENV}"
        )
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):  # oldest use first
        if total + incoming <= max_bytes:
            break
        if path.resolve() in protected:
            continue
        path.unlink(missing_ok=True)
        total -= size
        log.info("cache cap %.2f GB: evicted %s (%.1f MB, least recently used)", max_bytes / _GB, path, size / 1e6)
    with _counted_lock:
        _counted[node_root] = (now, total + incoming)


def _save(tensors: dict[str, Tensor], path: Path, *, metadata: dict[str, str] | None = None,
          node_root: Path, max_bytes: int, protected: Iterable[Path] = ()) -> None:
    """Write an entry atomically, first making room for it under the cap."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        # Measured on the written file; the temporary name is not an entry, so it is never evicted.
        _evict_for(tmp.stat().st_size, node_root=node_root, max_bytes=max_bytes, replacing=path, protected=protected)

    replace_atomically(path, write)


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """An entry's tensors and metadata, from one read of the file into memory.

    Not memory-mapped: what was verified is what is used, even if the file changes afterwards.
    """
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
    return load(data), metadata  # safetensors checks the header against the data


def _mark_used(path: Path, *, missing_ok: bool = True) -> None:
    # The modification time is the entry's last use: access times are often not kept (noatime).
    # Set at most once a USE_RESOLUTION_S: every use would change the file's signature, and the
    # other processes sharing this cache (a simulation's workers) would verify the file again.
    try:
        if time.time() - path.stat().st_mtime >= USE_RESOLUTION_S:
            os.utime(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


class ModelCache:
    """Full models the server sent once, keyed (and verified) by their content hash."""

    FOLDER = "models"

    def __init__(self, root: Path, *, max_bytes: int = int(DEFAULT_CACHE_MAX_GB * _GB)) -> None:
        self.node_root = root
        self.root = root / self.FOLDER
        self.max_bytes = max_bytes

    def path(self, model_hash: str) -> Path:
        # The hash comes from the server: only the exact form of a sha256 digest may become a file name.
        if not MODEL_HASH_FORM.fullmatch(model_hash):
            raise ValueError(f"not a model hash (64 lowercase hex characters): {model_hash[:80]!r}")
        return self.root / f"{model_hash}{_ENTRY_SUFFIX}"

    def has(self, model_hash: str) -> bool:
        return self.path(model_hash).is_file()

    def load(self, model_hash: str) -> dict[str, Tensor]:
        """The model's tensors; ModelNotCached if absent or damaged (a damaged entry is removed, so the
        node says it lacks the model and the server sends it again)."""
        return self.load_signed(model_hash)[0]

    def load_signed(self, model_hash: str) -> tuple[dict[str, Tensor], FileSignature]:
        """`load`, and the signature of the file the tensors were verified from.

        The entry is marked used first and its signature taken before the read: a write to the file
        after the read started changes the signature.
        """
        path = self.path(model_hash)
        try:
            if not path.is_file():
                raise FileNotFoundError(path)
            _mark_used(path, missing_ok=False)
            signature = FileSignature.of(path)
        except FileNotFoundError:
            raise ModelNotCached(f"{model_hash[:12]} is not in this node's cache ({self.root})") from None
        try:
            tensors, _ = _read(path)
            problem = None if state_hash(tensors) == model_hash else "its content does not hash to its name"
        except Exception as error:  # safetensors raises its own error types for torn or foreign files
            problem = f"unreadable: {error}"
        if problem is not None:
            log.warning("cached model %s is damaged (%s); it is removed and will be sent again", path, problem)
            path.unlink(missing_ok=True)
            raise ModelNotCached(f"{model_hash[:12]} was damaged in this node's cache ({problem}) and was removed")
        return tensors, signature

    def reuse(self, model_hash: str, signature: FileSignature) -> FileSignature | None:
        """Whether the entry's file is still the one `signature` describes: if so it is marked used,
        and its new signature returned; None if it changed or is gone (then read it with `load_signed`)."""
        path = self.path(model_hash)
        try:
            if FileSignature.of(path) != signature:
                return None
            _mark_used(path, missing_ok=False)
            return FileSignature.of(path)
        except FileNotFoundError:
            return None

    def store(self, model_hash: str, tensors: dict[str, Tensor]) -> None:
        """Keep the model the server sent, if it is what its hash announces (ValueError otherwise)."""
        path = self.path(model_hash)
        actual = state_hash(tensors)
        if actual != model_hash:
            raise ValueError(f"the model received hashes to {actual[:12]}, not the announced {model_hash[:12]}")
        # Checked before the write: a model that could never fit is refused without touching the cache.
        if num_bytes(tensors) > self.max_bytes:
            raise CacheFull(f"the model ({num_bytes(tensors) / _GB:.2f} GB) is larger than this node's cache cap "
                            f"({self.max_bytes / _GB:.2f} GB); raise it with cache-max-gb in the node config or "
                            f"{CACHE_MAX_ENV}")
        _save(tensors, path, node_root=self.node_root, max_bytes=self.max_bytes)


class FeatureCache:
    """Outputs of a frozen prefix of the model, computed once per (model, boundary, data).

    Each entry carries, in its safetensors metadata, a digest of the identity it was computed for
    and a checksum over that digest, the features and the labels: a flipped byte, replaced labels
    or an entry copied from another identity are detected on load, and the features recomputed.
    """

    FOLDER = "features"

    def __init__(self, root: Path, *, max_bytes: int = int(DEFAULT_CACHE_MAX_GB * _GB)) -> None:
        self.node_root = root
        self.root = root / self.FOLDER
        self.max_bytes = max_bytes

    @staticmethod
    def _identity_digest(identity: tuple[str, ...]) -> str:
        return hashlib.sha256("|".join(identity).encode()).hexdigest()

    @staticmethod
    def _checksum(identity_digest: str, tensors: dict[str, Tensor]) -> str:
        return hashlib.sha256(f"{_FEATURES_FORMAT}|{identity_digest}|{state_hash(tensors)}".encode()).hexdigest()

    def path(self, *identity: str) -> Path:
        return self.root / f"{self._identity_digest(identity)[:32]}{_ENTRY_SUFFIX}"

    def get(self, *identity: str) -> TensorDataset | None:
        """The cached features, or None when there are none, or they are damaged (then removed)."""
        path = self.path(*identity)
        if not path.is_file():
            return None
        try:
            tensors, metadata = _read(path)
            problem = self._problem(identity, metadata, tensors)
        except Exception as error:  # a torn or foreign file
            problem = f"unreadable: {error}"
        if problem is not None:
            log.warning("feature cache entry %s is damaged (%s); it is removed and the features are computed "
                        "again", path, problem)
            path.unlink(missing_ok=True)
            return None
        _mark_used(path)
        return TensorDataset(tensors["features"], tensors["labels"])

    def _problem(self, identity: tuple[str, ...], metadata: dict[str, str], tensors: dict[str, Tensor]) -> str | None:
        if set(tensors) != {"features", "labels"} or metadata.get("format") != _FEATURES_FORMAT:
            return "not a fedtune feature entry"
        digest = self._identity_digest(identity)
        if metadata.get("identity") != digest:
            return "computed for other inputs"
        if metadata.get("checksum") != self._checksum(digest, tensors):
            return "its features or labels do not match its checksum"
        features, labels = tensors["features"], tensors["labels"]
        if labels.dtype != torch.long or labels.dim() != 1 or features.shape[:1] != labels.shape:
            return "features and labels do not pair up"
        return None

    def put(self, dataset: TensorDataset, *identity: str, in_use: Iterable[Path] = ()) -> None:
        """Cache the features (best effort: if the cap leaves no room, they are simply not kept).

        `in_use` are entries that must not be evicted to make room (the model this round uses).
        """
        features, labels = dataset.tensors
        tensors = {"features": features, "labels": labels.to(torch.long)}
        digest = self._identity_digest(identity)
        metadata = {"format": _FEATURES_FORMAT, "identity": digest, "checksum": self._checksum(digest, tensors)}
        try:
            _save(tensors, self.path(*identity), metadata=metadata, node_root=self.node_root,
                  max_bytes=self.max_bytes, protected=in_use)
        except CacheFull as error:
            log.warning("features not cached (they are recomputed next round): %s", error)
