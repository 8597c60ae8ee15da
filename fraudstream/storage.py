"""Where the Parquet history lives: a local folder or an S3 bucket, behind one pyarrow filesystem.

``PARQUET_DIR`` is either a path (local, or a mounted network filesystem) or an
``s3://bucket/prefix`` URL. A URL becomes a ``RemotePath``, which joins with ``/`` like a
``Path``; ``filesystem(root)`` gives the pyarrow filesystem and the path inside it, so the
detector's sinks and every reader (``fraudstream.datasets``) work the same on both.

S3 credentials, region and endpoint come from the standard AWS settings that pyarrow reads:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``
or ``AWS_ENDPOINT_URL_S3`` (for an S3-compatible server such as MinIO), or the shared AWS config
files.

What S3 changes: an object becomes visible whole when its upload completes, so a batch file is
written straight to its final key (a local file goes through a temporary name and a rename).
Spark's checkpoint cannot go to S3 here: it would need Hadoop's S3A filesystem (the
``hadoop-aws`` jar), which the pyspark wheel does not include.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # pyarrow is imported when a filesystem is needed: settings import this
    from pyarrow import fs as pafs

__all__ = ["REMOTE_SCHEMES", "RemotePath", "StoragePath", "filesystem", "is_remote",
           "storage_path"]

#: URL schemes a ``RemotePath`` accepts (pyarrow's S3 filesystem).
REMOTE_SCHEMES: Final = ("s3",)


@dataclass(frozen=True)
class RemotePath:
    """``s3://bucket/prefix``: joins with ``/``, prints as the URL."""

    scheme: str
    path: str  # bucket/prefix, no leading or trailing slash

    @classmethod
    def parse(cls, url: str) -> RemotePath:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in REMOTE_SCHEMES:
            raise ValueError(f"not an object-store URL ({', '.join(REMOTE_SCHEMES)}://): {url}")
        path = rest.strip("/")
        if not path:
            raise ValueError(f"{url}: a bucket is required (s3://bucket/prefix)")
        return cls(scheme.lower(), path)

    def __truediv__(self, part: str | Path) -> RemotePath:
        return RemotePath(self.scheme, f"{self.path}/{str(part).strip('/')}")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


StoragePath = Path | RemotePath


def storage_path(value: str | Path | RemotePath) -> StoragePath:
    """A setting's value as a storage root: an ``s3://`` URL as a ``RemotePath``, anything
    else as a local ``Path`` (callers refuse other URL schemes with their own message)."""
    if isinstance(value, (Path, RemotePath)):
        return value
    text = str(value).strip()
    if text.lower().startswith(tuple(f"{scheme}://" for scheme in REMOTE_SCHEMES)):
        return RemotePath.parse(text)
    return Path(text).expanduser()


def is_remote(root: StoragePath | str) -> bool:
    return isinstance(storage_path(root), RemotePath)


@lru_cache(maxsize=8)
def _remote_filesystem(scheme: str) -> pafs.FileSystem:
    # One client per process (building one resolves credentials); only "s3" exists so far.
    assert scheme in REMOTE_SCHEMES, scheme
    from pyarrow import fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return pafs.S3FileSystem(endpoint_override=endpoint or None)


def filesystem(root: StoragePath | str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``root`` and ``root``'s path inside it."""
    from pyarrow import fs as pafs

    root = storage_path(root)
    if isinstance(root, RemotePath):
        return _remote_filesystem(root.scheme), root.path
    return pafs.LocalFileSystem(), str(root)
