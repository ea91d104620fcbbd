"""``file://`` URIs and plain paths, read alike: what results give is what loaders take.

Results and the artifacts table name files by ``file://`` URI; a user types paths. Every
loader of the pure core (``sae.load``, ``PatchGrid.from_json``) passes its argument through
``local_path``. (The artifact store has its own, stricter reader for other schemes.)
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse


def local_path(uri_or_path: str | Path) -> Path:
    """The local path behind a ``file://`` URI (``file:///abs/path``) or a plain path."""
    raw = str(uri_or_path)
    if not raw.startswith("file:"):
        return Path(raw).expanduser()
    parsed = urlparse(raw)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{raw!r}: a file:// URI names a local path (file:///abs/path)")
    return Path(unquote(parsed.path))
