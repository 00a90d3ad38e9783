"""A client node accepts only a bundle of its own fedtune; anything else the server sends is refused, never run."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedtune.bundle import (
    MAX_MEMBERS,
    BundleChecker,
    BundleRefused,
    check_bundle,
    local_identity,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local():  # noqa: ANN201 - AppIdentity
    return local_identity(REPO)


@pytest.fixture(scope="module")
def genuine() -> bytes:
    """The bundle `fedtune server` submits: Flower's own build of this checkout."""
    return build_fab_from_disk(REPO)


def _copy(tmp_path: Path) -> Path:
    """A copy of the app as `flwr run` would bundle it: pyproject.toml and the packages, plus a config."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO / "pyproject.toml", app)
    for package in ("fedtune", "client", "server", "configs"):
        shutil.copytree(REPO / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    return app


def _rezip(bundle: bytes, *, replace: dict[str, bytes] | None = None, add: list[tuple[str, bytes]] | None = None,
           drop: set[str] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(bundle)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if info.filename not in (drop or set()):
                target.writestr(info.filename, (replace or {}).get(info.filename, source.read(info)))
        for name, content in add or []:
            target.writestr(name, content)
    return out.getvalue()


def _refusal(bundle: bytes, local) -> str:  # noqa: ANN001 - AppIdentity
    with pytest.raises(BundleRefused) as refused:
        check_bundle(bundle, local)
    return str(refused.value)


def test_the_bundle_of_this_checkout_is_accepted_whatever_lies_outside_the_packages(tmp_path: Path, local) -> None:
    check_bundle(build_fab_from_disk(REPO), local)
    app = _copy(tmp_path)
    (app / "configs" / "mine.yaml").write_text("name: another-experiment\n")  # configs, tests, docs: free to differ
    (app / "notes.md").write_text("# notes\n")
    check_bundle(build_fab_from_disk(app), local)


def test_the_bundle_carries_the_apps_code_and_experiment_files_only(genuine: bytes) -> None:
    # pyproject.toml's fab-include: no README, benchmarks, deploy files or test helpers travel with a run.
    with zipfile.ZipFile(io.BytesIO(genuine)) as bundle:
        names = bundle.namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {".info", "pyproject.toml", "fedtune", "server", "client", "configs"}
    assert "configs/quickstart.yaml" in names  # the ServerApp reads it (run config `config`)
    assert all(name.endswith(".py") for name in names if name.split("/")[0] in {"fedtune", "server", "client"})


def test_one_changed_byte_in_a_runtime_file_is_named(tmp_path: Path, local) -> None:
    app = _copy(tmp_path)
    source = (app / "fedtune" / "client" / "app.py").read_bytes()
    (app / "fedtune" / "client" / "app.py").write_bytes(source.replace(b"ClientApp(", b"ClientApp (", 1))
    assert _refusal(build_fab_from_disk(app), local) == "1 source file(s) differ: fedtune/client/app.py"


def test_an_added_and_a_missing_runtime_file_are_named(tmp_path: Path, local) -> None:
    app = _copy(tmp_path)
    (app / "server" / "backdoor.py").write_text("import os\nos.system('id')\n")
    (app / "fedtune" / "strategies" / "central_dp.py").unlink()
    reason = _refusal(build_fab_from_disk(app), local)
    assert "1 source file(s) are not part of this node's fedtune: server/backdoor.py" in reason
    assert "1 source file(s) are missing from it: fedtune/strategies/central_dp.py" in reason


def test_another_app_is_refused_by_its_metadata_and_sources(local) -> None:
    reason = _refusal(build_fab_from_disk(REPO / "benchmarks" / "noop_app"), local)
    assert reason.startswith("name 'fedtune-noop' (this node: 'fedtune'); components {")
    assert "source file(s) are missing from it: client/__init__.py" in reason


@pytest.mark.parametrize(("line", "changed", "reason"), [
    ('version = "0.1.0"', 'version = "0.1.1"', "version '0.1.1' (this node: '0.1.0')"),
    ('publisher = "fedtune"', 'publisher = "mallory"', "publisher 'mallory' (this node: 'fedtune')"),
    ('clientapp = "client.app:app"', 'clientapp = "fedtune.worker:main"', "components {'serverapp'"),
])
def test_other_metadata_is_refused(tmp_path: Path, local, line: str, changed: str, reason: str) -> None:
    app = _copy(tmp_path)
    pyproject = (app / "pyproject.toml").read_text()
    assert line in pyproject
    (app / "pyproject.toml").write_text(pyproject.replace(line, changed))
    assert _refusal(build_fab_from_disk(app), local).startswith(reason)


def test_hostile_archives_are_refused_with_a_reason(genuine: bytes, local) -> None:
    assert _refusal(b"PK\x03\x04 not really a zip", local).startswith("it is not a zip archive")
    assert _refusal(b"\0" * (10 * 1024 * 1024 + 1), local).startswith("it is 10485761 bytes, over the")
    assert _refusal(_rezip(genuine, drop={"pyproject.toml"}), local) == "it has no pyproject.toml"
    assert "appears twice" in _refusal(_rezip(genuine, add=[("client/app.py", b"x = 1\n")]), local)
    assert _refusal(_rezip(genuine, replace={"pyproject.toml": b"\xff\xfe not utf-8"}), local).startswith(
        "its pyproject.toml cannot be used")
    assert _refusal(_rezip(genuine, replace={"pyproject.toml": b"[project\nname = 1"}), local).startswith(
        "its pyproject.toml cannot be used")
    assert _refusal(_rezip(genuine, replace={"pyproject.toml": b"[project]\nname = 'fedtune'\n"}), local).startswith(
        "its pyproject.toml cannot be used: it lacks")
    many = [(f"benchmarks/f{i}.json", b"{}") for i in range(MAX_MEMBERS)]
    assert "files, over the" in _refusal(_rezip(genuine, add=many), local)


def test_a_compression_bomb_is_never_unpacked(genuine: bytes, local) -> None:
    # 64 MB of zeros deflate to about 64 KB: refused on its declared size, before any unpacking.
    bomb = _rezip(genuine, replace={"client/app.py": b"\0" * (64 * 1024 * 1024)})
    assert len(bomb) < 1024 * 1024
    assert "'client/app.py' is 67108864 bytes, over the 1048576 a bundle file may have" in _refusal(bomb, local)


def test_the_verdict_on_a_bundle_is_remembered_by_its_own_hash(genuine: bytes, local) -> None:
    checker = BundleChecker(local)
    assert checker.refusal(genuine) is None
    other = _rezip(genuine, replace={"fedtune/nodes.py": b"# another fedtune\n"})
    refusal = checker.refusal(other)
    assert refusal is not None and "fedtune/nodes.py" in refusal
    assert "it is not this node's fedtune (fedtune/fedtune 0.1.0)" in refusal
    assert checker.refusal(other) is refusal  # not checked twice
