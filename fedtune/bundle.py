"""Whether an app bundle (FAB) sent by the server is this node's own fedtune, file by file.

A SuperNode receives the app of every run from the SuperLink as a FAB, a zip of the app's source
(flwr/cli/build.py, `build_fab_from_files`). Flower's client runtime unpacks it and imports its
ClientApp (flwr/supernode/runtime/run_clientapp.py:153-190), so whoever controls the server runs
code on every node. Flower's own check, `flower-supernode --trusted-entities`, accepts only bundles
that Flower's hosted platform has marked `valid_license` (flwr/supernode/start_client_internal.py:
344-352), so it cannot protect a self-hosted federation.

fedtune's worker (fedtune/worker.py) never runs code from a bundle: it runs the ClientApp installed
on the node, and only for a bundle that is the same fedtune: the same publisher, name and version,
the same `[tool.flwr.app.components]`, and byte-identical .py files in the packages that run
(fedtune/ and the app's components in client/ and server/), none missing and none added. Files outside those
packages (tests, benchmarks, configs, docs) do not matter. The bundle is read in memory, with
bounds on its size, its number of members and each member read; nothing in it is written to disk,
imported or executed.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common.constant import FAB_MAX_SIZE
from flwr.supercore.constant import MAX_FILE_BYTES, MAX_FILE_COUNT

APP_ROOT = Path(__file__).resolve().parents[1]  # pyproject.toml beside the packages
RUNTIME_PACKAGES = ("fedtune", "client", "server")
PYPROJECT = "pyproject.toml"
# Flower's own limits on what `flwr run` builds: 10 MB, 1,000 files of at most 1 MB
# (flwr/common/constant.py, flwr/supercore/constant.py); the manifest and pyproject.toml come on top.
MAX_MEMBERS = MAX_FILE_COUNT + 2
_SHOWN_FILES = 4  # of each kind of difference, in the reason
_REMEMBERED_VERDICTS = 16


class BundleRefused(Exception):
    """The bundle is not this node's fedtune; the message says what differs."""


@dataclass(frozen=True)
class AppIdentity:
    """What makes a bundle fedtune: its metadata and the bytes of its runtime sources."""

    publisher: str
    name: str
    version: str
    components: dict[str, str]
    sources: dict[str, bytes]  # "fedtune/client/app.py" -> its bytes

    @property
    def label(self) -> str:
        return f"{self.publisher}/{self.name} {self.version}"


def _is_runtime_source(relative: str) -> bool:
    parts = relative.split("/")
    # Flower leaves test files and caches out of every bundle (flwr/common/constant.py, FAB_EXCLUDE_PATTERNS).
    never_bundled = "__pycache__" in parts or parts[-1].startswith("test_") or parts[-1].endswith("_test.py")
    return len(parts) > 1 and parts[0] in RUNTIME_PACKAGES and relative.endswith(".py") and not never_bundled


def _metadata(pyproject: dict[str, Any]) -> tuple[str, str, str, dict[str, str]]:
    """(publisher, name, version, components) of a parsed pyproject.toml; ValueError naming what is missing."""
    try:
        project, app = pyproject["project"], pyproject["tool"]["flwr"]["app"]
        values = (app["publisher"], project["name"], project["version"])
        components = app["components"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"it lacks {error}") from None
    if not all(isinstance(v, str) for v in values) or not isinstance(components, dict):
        raise ValueError("its publisher, name, version or components are not strings")
    return (*values, {str(k): str(v) for k, v in components.items()})


def local_identity(root: Path = APP_ROOT) -> AppIdentity:
    """This node's fedtune, read from its installation (a source checkout or an editable install)."""
    pyproject_file = root / PYPROJECT
    if not pyproject_file.is_file():
        raise FileNotFoundError(f"{pyproject_file} not found: a client node runs fedtune from a source checkout or "
                                "an editable install (pip install -e), so that it can check the app the server sends")
    publisher, name, version, components = _metadata(tomllib.loads(pyproject_file.read_text(encoding="utf-8")))
    sources = {}
    for package in RUNTIME_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if _is_runtime_source(relative):
                sources[relative] = path.read_bytes()
    return AppIdentity(publisher, name, version, components, sources)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    if info.file_size > MAX_FILE_BYTES:
        raise BundleRefused(f"{info.filename!r} is {info.file_size} bytes, over the {MAX_FILE_BYTES} a bundle file "
                            "may have")
    try:
        with archive.open(info) as member:
            content = member.read(MAX_FILE_BYTES + 1)  # the size in the header may lie
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError, ValueError) as error:
        raise BundleRefused(f"{info.filename!r} cannot be read: {error}") from None
    if len(content) > MAX_FILE_BYTES:
        raise BundleRefused(f"{info.filename!r} unpacks to more than {MAX_FILE_BYTES} bytes")
    return content


def _differences(archive: zipfile.ZipFile, local: AppIdentity) -> list[str]:
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise BundleRefused(f"it has {len(members)} files, over the {MAX_MEMBERS} a bundle may have")
    by_name: dict[str, zipfile.ZipInfo] = {}
    for info in members:
        if info.filename in by_name:
            raise BundleRefused(f"{info.filename!r} appears twice in it")
        by_name[info.filename] = info
    if PYPROJECT not in by_name:
        raise BundleRefused(f"it has no {PYPROJECT}")
    try:
        pyproject = tomllib.loads(_read_member(archive, by_name[PYPROJECT]).decode("utf-8"))
        publisher, name, version, components = _metadata(pyproject)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as error:
        raise BundleRefused(f"its {PYPROJECT} cannot be used: {error}") from None

    differences = [f"{field} {theirs!r} (this node: {ours!r})" for field, theirs, ours in (
        ("publisher", publisher, local.publisher), ("name", name, local.name), ("version", version, local.version),
        ("components", components, local.components)) if theirs != ours]
    sources = sorted(n for n in by_name if _is_runtime_source(n))
    added = [n for n in sources if n not in local.sources]
    changed = [n for n in sources if n in local.sources and _read_member(archive, by_name[n]) != local.sources[n]]
    missing = sorted(set(local.sources) - set(sources))
    for files, what in ((changed, "differ"), (added, "are not part of this node's fedtune"),
                        (missing, "are missing from it")):
        if files:
            more = f" and {len(files) - _SHOWN_FILES} more" if len(files) > _SHOWN_FILES else ""
            differences.append(f"{len(files)} source file(s) {what}: {', '.join(files[:_SHOWN_FILES])}{more}")
    return differences


def check_bundle(content: bytes, local: AppIdentity) -> None:
    """Raise BundleRefused, saying what differs, unless `content` is a bundle of `local`."""
    if len(content) > FAB_MAX_SIZE:
        raise BundleRefused(f"it is {len(content)} bytes, over the {FAB_MAX_SIZE} Flower allows")
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as error:
        raise BundleRefused(f"it is not a zip archive: {error}") from None
    with archive:
        differences = _differences(archive, local)
    if differences:
        raise BundleRefused("; ".join(differences))


class BundleChecker:
    """`check_bundle` against this node's fedtune, remembering the verdict on recent bundles."""

    def __init__(self, local: AppIdentity) -> None:
        self.local = local
        self._verdicts: OrderedDict[str, str | None] = OrderedDict()  # sha256 of the bundle -> refusal or None

    def refusal(self, content: bytes) -> str | None:
        """Why the bundle `content` is refused, or None when it is this node's fedtune."""
        digest = hashlib.sha256(content).hexdigest()  # the bundle's own bytes, not the hash the server claims
        if digest not in self._verdicts:
            try:
                check_bundle(content, self.local)
                verdict = None
            except BundleRefused as refused:
                verdict = (f"app bundle {digest[:12]} refused: it is not this node's fedtune "
                           f"({self.local.label}): {refused}")
            self._verdicts[digest] = verdict
            if len(self._verdicts) > _REMEMBERED_VERDICTS:
                self._verdicts.popitem(last=False)
        self._verdicts.move_to_end(digest)
        return self._verdicts[digest]
