"""Credentials, tenants and quotas (pure: no gRPC, no Ray).

* A *tenant* has an admin token (configured on the service, kept only as its SHA-256) and
  quotas; its admin token creates, deletes, rotates and lists the tenant's jobs.
* A *job* has worker tokens ``psj.JOB_ID.SECRET``, minted by the front door, of which the
  service keeps only the SHA-256 and an expiry (0 = none). A worker token is accepted on the
  front door for the job's worker calls and on every shard port of the job.
* Tokens are compared by their hashes in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramserver.errors import ConfigError, ParamServerError, Reason

#: The prefix of worker tokens.
WORKER_PREFIX = "psj."
#: The metadata key tokens travel in, as "Bearer TOKEN".
METADATA_KEY = "authorization"
#: How long RotateJobToken may keep previous tokens valid (seconds).
MAX_PREVIOUS_VALID_S = 7 * 24 * 3600.0
#: Worker tokens a job accepts at once (beyond: RESOURCE_EXHAUSTED LIMIT_EXCEEDED; retire old ones
#: with RotateJobToken). Each CreateJob answer and each JoinJob made with an admin token issues one.
MAX_TOKENS_PER_JOB = 256
#: Longest token accepted in metadata (characters).
MAX_TOKEN_CHARS = 512

#: A job's accepted worker tokens: (SHA-256 hex, Unix expiry or 0 = never).
Tokens = tuple[tuple[str, float], ...]


def hash_token(token: str) -> str:
    """The SHA-256 hex digest the service keeps of a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_worker_token(job_id: str) -> str:
    """A fresh worker token for `job_id` (256 random bits)."""
    return f"{WORKER_PREFIX}{job_id}.{secrets.token_urlsafe(32)}"


def job_of_token(token: str) -> str | None:
    """The job a worker token names (not verified), or None for any other token."""
    if not token.startswith(WORKER_PREFIX):
        return None
    job_id, dot, secret = token[len(WORKER_PREFIX) :].rpartition(".")
    return job_id if dot and job_id and secret else None


def accepts(tokens: Tokens, token: str, now: float | None = None) -> bool:
    """Whether `token` is one of `tokens` and has not expired (constant-time per comparison)."""
    digest = hash_token(token)
    now = time.time() if now is None else now
    ok = False
    for h, expires in tokens:
        if hmac.compare_digest(h, digest) and (expires == 0 or now < expires):
            ok = True
    return ok


#: The white space allowed around a header value and after the scheme (HTTP's OWS: space, tab).
_OWS = " \t"


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the first "authorization: Bearer TOKEN" metadata entry, or None when there is
    none or it is malformed: another scheme, an empty token, one over MAX_TOKEN_CHARS, or one with
    a character that is not printable ASCII (tokens never have one, and gRPC clients cannot send
    one; the raw bytes of a header may hold anything). Only spaces and tabs around the token are
    ignored: not the other characters ``str.strip`` removes (U+001C to U+001F, NEL, NO-BREAK SPACE,
    the Unicode spaces...), which would make a token with such a suffix pass for the token."""
    for key, value in metadata or ():
        if key == METADATA_KEY and isinstance(value, str):
            scheme, _, rest = value.strip(_OWS).partition(" ")
            token = rest.strip(_OWS)
            if scheme.lower() == "bearer" and 0 < len(token) <= MAX_TOKEN_CHARS and token.isascii() and token.isprintable():
                return token
            return None
    return None


def add_token(tokens: Tokens, digest: str, now: float | None = None) -> Tokens:
    """`tokens` with `digest` accepted too (never expiring), expired ones dropped; a job that holds
    MAX_TOKENS_PER_JOB live tokens is RESOURCE_EXHAUSTED (a live token is never dropped silently)."""
    if any(h == digest for h, _ in tokens):
        return tokens
    live = check_room(tokens, now)
    return (*live, (digest, 0.0))


def check_room(tokens: Tokens, now: float | None = None) -> Tokens:
    """The live ones of `tokens`; RESOURCE_EXHAUSTED (LIMIT_EXCEEDED) when no other fits."""
    now = time.time() if now is None else now
    live = tuple((h, e) for h, e in tokens if e == 0 or e > now)
    if len(live) >= MAX_TOKENS_PER_JOB:
        raise ParamServerError(
            "RESOURCE_EXHAUSTED",
            Reason.LIMIT_EXCEEDED,
            f"the job holds {len(live)} live worker tokens, the most it keeps: retire old ones with RotateJobToken",
            {"field": "worker_token", "limit": MAX_TOKENS_PER_JOB},
        )
    return live


def rotate(tokens: Tokens, digest: str, previous_valid_s: float, now: float) -> tuple[Tokens, float]:
    """Accept `digest`; every other token expires `previous_valid_s` from `now` at the latest.
    Expired ones are dropped. Returns the new tokens and the previous tokens' expiry."""
    if not 0 <= previous_valid_s <= MAX_PREVIOUS_VALID_S:
        raise ConfigError("previous_valid_s", f"must be within [0, {MAX_PREVIOUS_VALID_S:.0f}] seconds, got {previous_valid_s}")
    until = now + previous_valid_s
    kept = tuple((h, until if e == 0 else min(e, until)) for h, e in tokens if h != digest and (e == 0 or e > now))
    return (*((h, e) for h, e in kept if e > now), (digest, 0.0)), until


@dataclass(frozen=True)
class Quota:
    """A tenant's limits (0 = unlimited)."""

    parameter_bytes: int = 0
    """fp32 bytes of parameters over all the tenant's jobs (4 per element)."""
    shards: int = 0
    """Shards over all the tenant's jobs."""
    workers: int = 0
    """Members over all the tenant's jobs."""
    streams: int = 0
    """Concurrent data-plane streams one shard of a job serves."""
    snapshot_bytes: int = 0
    """Bytes of committed snapshots over all the tenant's jobs."""

    def check(self, quota: str, used: int, requested: int) -> None:
        """RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) when `used + requested` passes the limit `quota`."""
        limit = int(getattr(self, quota))
        if limit and used + requested > limit:
            raise ParamServerError(
                "RESOURCE_EXHAUSTED",
                Reason.QUOTA_EXCEEDED,
                f"quota {quota} exceeded: {used} used + {requested} requested > {limit}",
                {"quota": quota, "limit": limit, "used": used, "requested": requested},
            )


@dataclass(frozen=True)
class Tenant:
    """One tenant: its name, its admin token's SHA-256, its quotas."""

    name: str
    token_sha256: str
    quota: Quota = field(default_factory=Quota)


@dataclass(frozen=True)
class Caller:
    """Who makes a call: an admin of `tenant`, a worker of `job_id`, or anyone (no credentials)."""

    kind: str
    """"admin", "worker" or "open"."""
    tenant: str = ""
    job_id: str = ""


#: The caller of a service that runs without credentials.
OPEN = Caller("open")


@dataclass(frozen=True)
class AuthConfig:
    """The tenants of a service that requires credentials."""

    tenants: tuple[Tenant, ...]

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ValueError("at least one tenant is needed")
        names = [t.name for t in self.tenants]
        if any(not n for n in names):
            raise ValueError("a tenant needs a name")
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names repeat: {names}")

    @classmethod
    def single(cls, admin_token: str, quota: Quota | None = None) -> AuthConfig:
        """One tenant, "default", whose admin token is `admin_token`."""
        if not (16 <= len(admin_token) <= MAX_TOKEN_CHARS and admin_token.isascii() and admin_token.isprintable()):
            # (no client could present another: see `bearer`)
            raise ValueError(f"an admin token must have 16 to {MAX_TOKEN_CHARS} characters, printable ASCII")
        return cls((Tenant("default", hash_token(admin_token), quota or Quota()),))

    def admin(self, token: str) -> Tenant | None:
        """The tenant whose admin token `token` is, or None."""
        digest = hash_token(token)
        found = None
        for t in self.tenants:
            if hmac.compare_digest(t.token_sha256, digest):
                found = t
        return found

    def tenant(self, name: str) -> Tenant | None:
        """The tenant called `name`."""
        return next((t for t in self.tenants if t.name == name), None)


def load_tenants(path: str | Path) -> AuthConfig:
    """Tenants from a JSON file::

        {"tenants": [{"name": "team-a", "token_sha256": "<hex>",
                      "quota": {"parameter_bytes": 4000000000, "shards": 8, "workers": 16,
                                "streams": 64, "snapshot_bytes": 100000000000}}]}

    (`paramserver hash-token` prints a token's SHA-256.)"""
    raw = json.loads(Path(path).read_text())
    return AuthConfig(tuple(_tenant(t) for t in raw.get("tenants", [])))


def _tenant(d: Mapping[str, Any]) -> Tenant:
    digest = str(d["token_sha256"]).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"tenant {d.get('name')!r}: token_sha256 must be 64 hex digits")
    known = {"parameter_bytes", "shards", "workers", "streams", "snapshot_bytes"}
    q = dict(d.get("quota", {}))
    unknown = set(q) - known
    if unknown:
        raise ValueError(f"tenant {d.get('name')!r}: unknown quota {sorted(unknown)} (known: {sorted(known)})")
    if any(int(v) < 0 for v in q.values()):
        raise ValueError(f"tenant {d.get('name')!r}: quotas must be >= 0")
    return Tenant(str(d["name"]), digest, Quota(**{k: int(v) for k, v in q.items()}))


def unauthenticated(message: str) -> ParamServerError:
    """UNAUTHENTICATED."""
    return ParamServerError("UNAUTHENTICATED", Reason.UNAUTHENTICATED, message)


def denied(message: str, **metadata: object) -> ParamServerError:
    """PERMISSION_DENIED."""
    return ParamServerError("PERMISSION_DENIED", Reason.PERMISSION_DENIED, message, metadata)
