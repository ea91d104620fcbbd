"""The one atomic writer (``interpq.core.atomic``) and the store's use of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from interpq.core.atomic import write_atomic
from interpq.store.artifacts import FileStore


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a" / "x.json"
    assert write_atomic(path, "first")

    def torn(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, torn)
    assert path.read_text() == "first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_first_complete_writer_wins_without_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "shard.bin"
    assert write_atomic(path, b"one", overwrite=False)
    assert not write_atomic(path, b"two", overwrite=False)
    assert path.read_bytes() == b"one"
    assert write_atomic(path, b"three")
    assert path.read_bytes() == b"three"


def test_a_directory_is_renamed_into_place_whole(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    uri = store.uri_for("sae", "job", "topk")

    def save(files: dict[str, str]):  # type: ignore[no-untyped-def]
        return lambda tmp: [(tmp / k).write_text(v) for k, v in files.items()]

    assert store.put_tree(uri, save({"cfg.json": "{}", "w.bin": "1"}))
    assert not store.put_tree(uri, save({"x": "1"}), overwrite=False)  # the first copy stays
    assert store.put_tree(uri, save({"cfg.json": "{2}"}))  # a redelivered job: replaced
    final = store.local_path(uri)
    assert sorted(p.name for p in final.iterdir()) == ["cfg.json"]
    assert (final / "cfg.json").read_text() == "{2}"
    assert not any((tmp_path / "root" / ".tmp").iterdir())
    stored = store.put_atomic(store.uri_for("a.txt"), b"abc")
    assert stored.size_bytes == 3 and stored.created
    assert stored.sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
