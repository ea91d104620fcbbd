"""The artifact store: where arrays, weights and plots go, behind one small interface.

An artifact is named by a URI under the store's root (``file:///srv/interpq-artifacts/...``).
Jobs ask the store for URIs (``uri_for("activations", "shards", name)``), write through
``put_atomic`` and read through ``open`` / ``local_path``; they never build paths themselves,
so an object store (``s3://...``) can be added as another class with the same five methods
without touching a job.

``put_atomic`` writes through the one atomic writer (``interpq.core.atomic``) into a
temporary file under ``<root>/.tmp/`` (named after the writing process id) and then renames it
into place: a reader (or a worker started after another was
killed) sees either no artifact or a complete one, never a torn file. With
``overwrite=False`` the first complete writer wins and later writers keep what is there
(content-addressed files are written once). ``delete`` removes a file or a folder;
``sweep_temporaries`` removes temporary files whose writer was killed (its process is gone
from this host) or that are older than a day.

Only ``file://`` roots exist today. This module knows nothing about what the bytes mean.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol
from urllib.parse import unquote, urljoin, urlparse

from interpq.core.atomic import write_atomic
from interpq.errors import ConfigError

if TYPE_CHECKING:
    from interpq.settings import Settings

TMP_DIR = ".tmp"
STALE_TMP_S = 24 * 3600.0
"""A temporary file this old is stale whatever wrote it (writers on other hosts too)."""
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
"""Names this host in temporary file names, so only this host's dead writers are judged."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Stored:
    """What ``put_atomic`` wrote (or found, when the artifact was already complete)."""

    uri: str
    sha256: str
    size_bytes: int
    created: bool
    """False when ``overwrite=False`` and a complete artifact was already there."""


@dataclass(frozen=True)
class Written:
    """What a ``put_atomic`` writer may return: the sha256 of the bytes it wrote, computed as
    it wrote them (``interpq.store.hashing``), so that the file is not read again."""

    sha256: str


class ArtifactStore(Protocol):
    """The interface every store implements (``FileStore`` today)."""

    root_url: str

    def uri_for(self, *parts: str) -> str: ...
    def exists(self, uri: str) -> bool: ...
    def open(self, uri: str) -> IO[bytes]: ...
    def local_path(self, uri: str) -> Path: ...
    def put_atomic(
        self, uri: str, write: Callable[[Path], object] | bytes, *, overwrite: bool = True
    ) -> Stored: ...
    def put_tree(
        self, uri: str, write: Callable[[Path], object], *, overwrite: bool = True
    ) -> bool: ...
    def delete(self, uri: str) -> None: ...
    def sweep_temporaries(self) -> int: ...


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(base_uri: str, ref: str) -> str:
    """A reference relative to ``base_uri`` (as written in manifests) made absolute."""
    return urljoin(base_uri, ref)


def relative(from_uri: str, to_uri: str) -> str:
    """The reference from the artifact ``from_uri`` to ``to_uri`` (same root), for manifests."""
    base, target = urlparse(from_uri), urlparse(to_uri)
    if (base.scheme, base.netloc) != (target.scheme, target.netloc):
        return to_uri
    return posixpath.relpath(target.path, posixpath.dirname(base.path))


class FileStore:
    """Artifacts as files under a local (or mounted shared) directory."""

    def __init__(self, root: str | Path) -> None:
        raw = str(root)
        path = _file_url_path(raw) if raw.startswith("file:") else Path(raw)
        self.root = path.resolve()
        self.root_url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"FileStore({self.root_url!r})"

    def uri_for(self, *parts: str) -> str:
        """The URI of ``<root>/part/part/...`` (parts may hold slashes; no ``..``)."""
        rel = posixpath.join(*parts) if parts else ""
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"artifact names are relative and stay under the root: {rel!r}")
        return (self.root / rel).as_uri()

    def local_path(self, uri: str) -> Path:
        """The file behind ``uri`` (for memory-mapping); it must lie under the root."""
        if not uri.startswith("file:"):
            raise ConfigError(f"{uri!r} is not a file:// URI; this store's root is {self.root_url}")
        path = _file_url_path(uri)
        if path != self.root and self.root not in path.parents:
            raise ConfigError(f"{uri} lies outside the artifact root {self.root_url}")
        return path

    def exists(self, uri: str) -> bool:
        return self.local_path(uri).is_file()

    def open(self, uri: str) -> IO[bytes]:
        return open(self.local_path(uri), "rb")

    def delete(self, uri: str) -> None:
        """Remove a file, or a directory with everything under it; absent is fine."""
        path = self.local_path(uri)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def sweep_temporaries(self, max_age_s: float = STALE_TMP_S) -> int:
        """Remove temporary files of writers that died on this host, and any older than
        ``max_age_s``. Returns how many were removed. Folders are left alone."""
        tmp_dir = self.root / TMP_DIR
        if not tmp_dir.is_dir():
            return 0
        now, removed = time.time(), 0
        for path in tmp_dir.iterdir():
            pid, _, rest = path.name.partition("-")
            ours = rest.startswith(f"{HOST_TAG}-") and pid.isdigit()
            try:
                if not path.is_file():
                    continue
                if (ours and not _alive(int(pid))) or now - path.stat().st_mtime > max_age_s:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer published or removed it meanwhile
                continue
        return removed

    def put_atomic(
        self, uri: str, write: Callable[[Path], object] | bytes, *, overwrite: bool = True
    ) -> Stored:
        """Write the artifact: ``write(tmp_path)`` (or the bytes) to a temporary file, fsync,
        then rename to ``uri``. Returns its sha256 and size: of the bytes given, or of the file
        read back, unless ``write`` returns a ``Written`` (the digest it computed while writing).

        ``overwrite=False``: if a complete file is already there (another writer finished
        first), keep it and return its digest with ``created=False``.
        """
        final = self.local_path(uri)
        # who wrote it: <pid>-<host>-<random>-<name> (``sweep_temporaries`` reads it)
        tmp_name = f"{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:12]}-{final.name}"
        stored: list[tuple[str, int]] = []

        def write_and_digest(tmp: Path) -> None:
            written: object = None
            if isinstance(write, bytes | bytearray | memoryview):
                tmp.write_bytes(write)
                written = Written(hashlib.sha256(write).hexdigest())  # not read back
            else:
                written = write(tmp)
            digest = written.sha256 if isinstance(written, Written) else sha256_file(tmp)
            stored.append((digest, tmp.stat().st_size))

        created = write_atomic(
            final, write_and_digest, tmp_dir=self.root / TMP_DIR, tmp_name=tmp_name,
            overwrite=overwrite,
        )  # fmt: skip
        digest, size = stored[0]
        if not created:
            digest, size = sha256_file(final), final.stat().st_size
        return Stored(uri, digest, size, created)

    def put_tree(
        self, uri: str, write: Callable[[Path], object], *, overwrite: bool = True
    ) -> bool:
        """Write a directory artifact: ``write(tmp_dir)`` fills a temporary directory under
        ``<root>/.tmp/``, which is then renamed to ``uri`` as a whole, replacing an earlier
        complete copy (``overwrite=False``: keeping it). False when it kept one."""
        final = self.local_path(uri)
        tmp_name = f"{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:12]}-{final.name}"

        def fill(tmp: Path) -> None:
            tmp.mkdir()
            write(tmp)

        return write_atomic(
            final, fill, tmp_dir=self.root / TMP_DIR, tmp_name=tmp_name, overwrite=overwrite
        )


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): kill(0) said it exists
        return True


def to_local_path(uri_or_path: str | Path) -> Path:
    """The local file behind a ``file://`` URI or a plain path (other schemes: ConfigError)."""
    raw = str(uri_or_path)
    if not _is_local(raw):
        raise ConfigError(f"{raw!r}: only local paths and file:// URIs can be read here")
    return _file_url_path(raw) if raw.startswith("file:") else Path(raw)


def _file_url_path(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ConfigError(f"{url!r}: file:// URLs name a local path (file:///abs/path)")
    return Path(unquote(parsed.path))


def _is_local(root_url: str) -> bool:
    scheme = urlparse(root_url).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a path (or a Windows drive letter)


def open_store(root_url: str) -> ArtifactStore:
    """The store for a root: a path or ``file://`` URL (object stores: not yet)."""
    if _is_local(root_url):
        return FileStore(root_url)
    raise ConfigError(
        f"INTERPQ_ARTIFACTS_DIR={root_url!r}: only local paths and file:// URLs are supported "
        "(mount shared storage and give its path)"
    )


def get_store(settings: Settings | None = None) -> ArtifactStore:
    """The store named by the settings (``INTERPQ_ARTIFACTS_DIR``; default: the process's)."""
    from interpq.settings import get_settings

    return store_for(settings or get_settings())


def store_for(settings: Settings) -> ArtifactStore:
    """The store named by ``settings.artifacts_dir``."""
    if _is_local(settings.artifacts_dir):
        return FileStore(settings.artifacts_path())  # relative paths: from the working directory
    return open_store(settings.artifacts_dir)
