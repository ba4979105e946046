"""The snapshot store a URL names (``serve --snapshot-dir``): a directory, or ``s3://bucket/prefix``."""

from __future__ import annotations

from paramserver.errors import ParamServerError
from paramserver.s3_store import S3Store
from paramserver.snapshot_store import DirectoryStore, SnapshotStore


def open_store(url: str) -> SnapshotStore:
    """The store for ``serve --snapshot-dir``: ``s3://bucket/prefix`` or a directory; anything
    else with a scheme is INVALID_ARGUMENT naming ``snapshot_dir``."""
    if url.startswith("s3://"):
        return S3Store(url)
    if "://" in url:
        raise ParamServerError.invalid("snapshot_dir", f"unsupported snapshot store {url!r} (a directory or s3://bucket/prefix)")
    return DirectoryStore(url)
