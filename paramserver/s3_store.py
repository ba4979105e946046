"""Snapshots in an S3-compatible object store (boto3): ``serve --snapshot-dir s3://bucket/prefix``.

Keys: ``PREFIX/JOB_ID/SNAPSHOT/NAME``. A shard file is one multipart upload (16 MiB parts, streamed
as it is produced): it becomes visible whole when the upload completes, or never, so an upload cut
short by a crash is only an unfinished multipart upload, which the crash cleanup aborts. The
manifest is put last and is the commit marker, as in the directory store.

Credentials, region and endpoint come from boto3's usual sources on every node (environment,
config files, instance roles); ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) points at an
S3-compatible server (MinIO, Ceph, moto).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from paramserver import snapshot_names as names
from paramserver.errors import ParamServerError, Reason
from paramserver.manifest import Manifest, ShardEntry, data_loss
from paramserver.snapshot_store import CleanReport, FaultHook, SnapshotRef, Tensors, no_fault
from paramserver.tensor_file import write_tensors

#: Bytes per uploaded part (S3 needs at least 5 MiB for every part but the last).
PART_BYTES = 16 << 20


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")


def unavailable(what: str, exc: Exception) -> ParamServerError:
    """UNAVAILABLE for an object store that cannot be reached or refuses a call."""
    return ParamServerError("UNAVAILABLE", Reason.SNAPSHOT_FAILED, f"object store: {what}: {exc}", {"what": what})


class _Upload:
    """A multipart upload fed by write_tensors (parts of PART_BYTES)."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        self.parts: list[dict[str, Any]] = []
        self.buf = bytearray()

    def write(self, data: memoryview) -> None:
        self.buf += data
        while len(self.buf) >= PART_BYTES:
            self._part(bytes(self.buf[:PART_BYTES]))
            del self.buf[:PART_BYTES]

    def _part(self, body: bytes) -> None:
        n = len(self.parts) + 1
        r = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n, Body=body)
        self.parts.append({"PartNumber": n, "ETag": r["ETag"]})

    def flush(self) -> None:
        if self.buf or not self.parts:
            self._part(bytes(self.buf))
            self.buf.clear()

    def complete(self) -> None:
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}
        )

    def abort(self) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except (ClientError, BotoCoreError):
            pass  # the cleanup at the next start aborts it


class S3RangeReader:
    """Range reads of one object."""

    def __init__(self, client: Any, bucket: str, key: str, where: str) -> None:
        self.client, self.bucket, self.key, self.where = client, bucket, key, where
        try:
            self._size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if _missing(exc):
                raise data_loss(where, "missing") from None
            raise unavailable(f"head {key}", exc) from exc
        except BotoCoreError as exc:
            raise unavailable(f"head {key}", exc) from exc

    @property
    def size(self) -> int:
        """Bytes."""
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`."""
        if length == 0:
            return b""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={offset}-{offset + length - 1}")["Body"]
            data = bytes(body.read())
        except ClientError as exc:
            if _missing(exc):
                raise data_loss(self.where, "missing") from None
            raise unavailable(f"get {self.key}", exc) from exc
        except BotoCoreError as exc:
            raise unavailable(f"get {self.key}", exc) from exc
        if len(data) != length:
            raise data_loss(self.where, f"short read at byte {offset + len(data)}")
        return data


class S3Store:
    """The SnapshotStore of an S3 bucket and prefix (see the module docstring)."""

    def __init__(self, url: str, client: Any = None) -> None:
        if not url.startswith("s3://") or len(url) <= len("s3://"):
            raise ParamServerError.invalid("snapshot_dir", f"{url!r} is not s3://bucket[/prefix]")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = client or boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    # ---- keys ------------------------------------------------------------------------------------

    def _base(self, job_id: str = "") -> str:
        parts = [p for p in (self.prefix, job_id) if p]
        return "/".join(parts) + "/" if parts else ""

    def _key(self, ref: SnapshotRef, name: str = "") -> str:
        return f"{self._base(ref.job_id)}{ref.name}/{name}"

    def path(self, ref: SnapshotRef) -> str:
        """s3://bucket/prefix/JOB/SNAPSHOT."""
        return f"{self.url}/{ref.job_id}/{ref.name}"

    def parse(self, path: str) -> SnapshotRef | None:
        """The snapshot an s3:// URL under this store names."""
        if not path.startswith(self.url + "/"):
            return None
        rest = path[len(self.url) + 1 :].strip("/").split("/")
        return SnapshotRef(rest[0], rest[1]) if len(rest) == 2 and all(rest) else None

    # ---- calls -----------------------------------------------------------------------------------

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kw)
        except (ClientError, BotoCoreError) as exc:
            raise unavailable(what, exc) from exc

    def _put(self, key: str, body: bytes) -> None:
        self._call(f"put {key}", self.client.put_object, Key=key, Body=body)

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self._call("delete", self.client.delete_objects, Delete={"Objects": batch, "Quiet": True})

    def _objects(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            r = self._call(f"list {prefix}", self.client.list_objects_v2, Prefix=prefix, **token)
            keys += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return keys
            token = {"ContinuationToken": r["NextContinuationToken"]}

    def _snapshots(self, job_id: str) -> dict[str, set[str]]:
        """Snapshot name -> the names of its objects."""
        base = self._base(job_id)
        out: dict[str, set[str]] = {}
        for key in self._objects(base):
            snap, _, name = key[len(base) :].partition("/")
            if snap and name and "/" not in name:
                out.setdefault(snap, set()).add(name)
        return out

    def begin(self, ref: SnapshotRef) -> None:
        """Put the in-progress mark."""
        self._put(self._key(ref, names.IN_PROGRESS), f"{time.time():.0f}\n".encode())

    def write_file(
        self, ref: SnapshotRef, name: str, tensors: Tensors, metadata: Mapping[str, str], fault: FaultHook = no_fault
    ) -> ShardEntry:
        """One multipart upload, completed only once every byte is uploaded."""
        fault("write", name)
        try:
            upload = _Upload(self.client, self.bucket, self._key(ref, name))
        except (ClientError, BotoCoreError) as exc:
            raise unavailable(f"upload {name}", exc) from exc
        try:
            written = write_tensors(upload, tensors, metadata)
            upload.flush()
            fault("fsync", name)
            fault("rename", name)
            upload.complete()
        except (ClientError, BotoCoreError) as exc:
            upload.abort()
            raise unavailable(f"upload {name}", exc) from exc
        except BaseException:
            upload.abort()
            raise
        return ShardEntry(-1, name, written.size, written.sha256, (), 0)

    def commit(self, ref: SnapshotRef, manifest: Manifest, fault: FaultHook = no_fault) -> None:
        """Put the manifest (the commit), then remove the mark."""
        fault("manifest", names.MANIFEST)
        self._put(self._key(ref, names.MANIFEST), manifest.to_json())
        self._delete([self._key(ref, names.IN_PROGRESS)])

    def jobs(self) -> list[str]:
        """Jobs with anything stored."""
        base = self._base()
        r = self._call("list jobs", self.client.list_objects_v2, Prefix=base, Delimiter="/")
        return sorted(p["Prefix"][len(base) :].rstrip("/") for p in r.get("CommonPrefixes", []))

    def snapshots(self, job_id: str) -> list[SnapshotRef]:
        """Snapshots with a manifest, oldest first."""
        return sorted(SnapshotRef(job_id, s) for s, objs in self._snapshots(job_id).items() if names.MANIFEST in objs)

    def open(self, ref: SnapshotRef, name: str) -> S3RangeReader:
        """A range reader over one object."""
        return S3RangeReader(self.client, self.bucket, self._key(ref, name), f"{self.path(ref)}/{name}")

    def read_manifest(self, ref: SnapshotRef) -> Manifest:
        """Get and check the manifest."""
        reader = self.open(ref, names.MANIFEST)
        return Manifest.parse(reader.read(0, reader.size), f"{self.path(ref)}/{names.MANIFEST}")

    def delete(self, ref: SnapshotRef) -> None:
        """Mark, uncommit, remove the files, remove the mark."""
        objs = self._snapshots(ref.job_id).get(ref.name, set())
        if not objs:
            return
        self.begin(ref)
        self._delete([self._key(ref, names.MANIFEST)])
        self._delete([self._key(ref, n) for n in objs if n not in (names.MANIFEST, names.IN_PROGRESS)])
        self._delete([self._key(ref, names.IN_PROGRESS)])

    def clean(self, job_id: str | None = None) -> CleanReport:
        """Abort unfinished uploads, delete saves cut short, quarantine snapshots that lost their manifest."""
        report = CleanReport()
        for job in [job_id] if job_id is not None else self.jobs():
            r = self._call("list uploads", self.client.list_multipart_uploads, Prefix=self._base(job))
            for u in r.get("Uploads", []):
                self._call("abort upload", self.client.abort_multipart_upload, Key=u["Key"], UploadId=u["UploadId"])
                report.removed.append(f"s3://{self.bucket}/{u['Key']} (unfinished upload)")
            for snap, objs in sorted(self._snapshots(job).items()):
                ref = SnapshotRef(job, snap)
                if names.MANIFEST in objs:
                    if names.IN_PROGRESS in objs:
                        self._delete([self._key(ref, names.IN_PROGRESS)])
                elif names.IN_PROGRESS in objs:
                    self._delete([self._key(ref, n) for n in objs if n != names.IN_PROGRESS])
                    self._delete([self._key(ref, names.IN_PROGRESS)])
                    report.removed.append(self.path(ref))
                else:
                    if names.QUARANTINE not in objs:
                        note = {"reason": "manifest.json is missing but the snapshot was committed", "at": time.time()}
                        self._put(self._key(ref, names.QUARANTINE), (json.dumps(note) + "\n").encode())
                    report.quarantined.append(self.path(ref))
        return report

    def quarantined(self, job_id: str) -> list[SnapshotRef]:
        """Snapshots of a job that lost their manifest."""
        return sorted(SnapshotRef(job_id, s) for s, objs in self._snapshots(job_id).items() if names.QUARANTINE in objs)
