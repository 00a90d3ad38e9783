"""The one atomic writer: a file is swapped in whole or not at all, with the permissions its caller asked for."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

import pytest

from fedtune.atomic import replace_atomically, write_bytes_atomically, write_text_atomically
from fedtune.credentials import make_node_key
from fedtune.loopback_tls import make_loopback_tls
from fedtune.processes import NodeError


def permissions(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_writer_that_fails_half_way_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "history.json"
    target.write_text("the old history\n")

    def crash_half_way(tmp: Path) -> None:
        tmp.write_text("the first half of the new hist")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(target, crash_half_way)

    assert target.read_text() == "the old history\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


def test_a_text_writer_that_fails_half_way_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    write_text_atomically(target, "old\n")

    def crash_half_way(file: IO[str]) -> None:
        file.write("new, but only in part")
        raise KeyboardInterrupt  # a Ctrl-C during the write

    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(target, crash_half_way)

    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_text_is_utf8_and_line_endings_are_kept(tmp_path: Path) -> None:
    path = write_text_atomically(tmp_path / "t.csv", "a,ünï\r\nb,c\n")

    assert path.read_bytes() == "a,ünï\r\nb,c\n".encode()


def test_mode_gives_exact_permissions_even_under_a_loose_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        private = write_bytes_atomically(tmp_path / "server.key", b"secret", mode=0o600)
        plain = write_bytes_atomically(tmp_path / "ca.crt", b"public")
    finally:
        os.umask(previous)

    assert permissions(private) == 0o600
    assert permissions(plain) == 0o666  # without a mode, the umask decides as for any new file


def test_a_key_replacing_a_world_readable_file_is_owner_only(tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(b"an earlier start's key")
    key.chmod(0o644)

    write_bytes_atomically(key, b"new key", mode=0o600)

    assert key.read_bytes() == b"new key"
    assert permissions(key) == 0o600


def test_the_temp_file_is_owner_only_while_a_private_file_is_written(tmp_path: Path) -> None:
    seen: list[int] = []

    def write(tmp: Path) -> None:
        seen.append(permissions(tmp))  # before any byte is in it
        tmp.write_bytes(b"secret")
        seen.append(permissions(tmp))

    previous = os.umask(0)
    try:
        replace_atomically(tmp_path / "node.key", write, mode=0o640)
    finally:
        os.umask(previous)

    assert seen == [0o600, 0o600]
    assert permissions(tmp_path / "node.key") == 0o640


def test_exclusive_never_replaces_an_existing_file(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    key.write_bytes(b"the node's only key")

    with pytest.raises(FileExistsError):
        write_bytes_atomically(key, b"another key", mode=0o600, exclusive=True)

    assert key.read_bytes() == b"the node's only key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]
    assert write_bytes_atomically(tmp_path / "fresh.key", b"k", exclusive=True).read_bytes() == b"k"


def test_a_planted_symlink_is_not_written_through(tmp_path: Path) -> None:
    # Even a link at the target's name is replaced, never followed: the file it points to is untouched.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not fedtune's")
    target = tmp_path / "config.toml"
    target.symlink_to(elsewhere)

    write_text_atomically(target, "[superlink]\n")

    assert elsewhere.read_text() == "not fedtune's"
    assert not target.is_symlink() and target.read_text() == "[superlink]\n"


def test_node_keys_are_owner_only_and_never_overwritten(tmp_path: Path) -> None:
    private = tmp_path / "keys" / "node"

    public = make_node_key(private)

    assert permissions(private) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    before = private.read_bytes()
    with pytest.raises(NodeError, match="not overwriting existing key files"):
        make_node_key(private)
    assert private.read_bytes() == before


def test_loopback_tls_key_is_owner_only_after_a_looser_earlier_one(tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    first = make_loopback_tls(folder)
    first.key.chmod(0o644)  # as an older fedtune, or a user, may have left it

    second = make_loopback_tls(folder)

    assert permissions(second.key) == 0o600
    assert second.key.read_bytes() != b"" and second.ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "server.crt", "server.key"]
