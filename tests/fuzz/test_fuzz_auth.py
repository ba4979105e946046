"""Fuzzing the credentials checks: the front door's (paramserver/gate.py FrontDoorGate) and every
shard port's (ShardGate), on a service that requires credentials: two tenants with admin tokens,
a worker token per job, and a token of the reference job retired by a rotation.

Every JobService and ShardService method is called with well-formed requests (tenant A's jobs;
tenant B's job too on the shards) and ``authorization`` metadata that does not authorize the call:
none, garbled text, another scheme, a valid token mutated, oversized, bytes a gRPC client refuses
to send (non-ASCII, control characters: sent through a relay, see conftest.HeaderProxy), two
entries, a token under another key, a retired token, and valid credentials of another job, another
tenant or another role. The answer each must get is computed from the rules README "Security"
states (:func:`expect_front_door`, :func:`expect_shard`), not from the gate's code:
UNAUTHENTICATED or PERMISSION_DENIED with the reason of the same name. Each case also checks the
properties of the fuzz tier (conftest.py): never INTERNAL or UNKNOWN, an ErrorInfo reason, the
state unchanged (every tenant's jobs, tokens and members included), and the service trains
afterwards (tenant A's jobs and tenant B's).

Cases: for every method, one of each kind of credential (:data:`TABLE`), then
max(4, PARAMSERVER_FUZZ_EXAMPLES // 3) drawn by hypothesis; the gates' functions alone (no
service) are fuzzed with 5 * PARAMSERVER_FUZZ_EXAMPLES examples against the same rules.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from paramserver.access import MAX_TOKEN_CHARS, AuthConfig, Tenant, Tokens, hash_token
from paramserver.errors import ParamServerError
from paramserver.gate import FrontDoorGate, ShardGate
from paramserver.membership import Roster
from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client.aio import make_spec
from paramserver_client.codec import FLOAT32
from paramserver_client.reasons import Reason
from tests.fuzz.conftest import (
    CALL_S,
    EXAMPLES,
    FOREIGN,
    FUZZ,
    HYPER,
    JOB_SERVICE,
    MIN_RAW_HEADER,
    REF,
    SHAPES,
    SHARD_SERVICE,
    SLOW_S,
    TIMEOUT,
    UPL,
    FuzzService,
    Metadata,
    Outcome,
    assert_same,
    method_path,
    record,
)
from tests.fuzz.strategies import VALID, Cover, Plan, Ref, StreamCase, build, covers, materialize

ADMIN_A = "fuzz-admin-token-of-tenant-a-0123"
ADMIN_B = "fuzz-admin-token-of-tenant-b-0123"
TENANT_A, TENANT_B = "team-a", "team-b"
B_JOB = "b-job"
TENANTS = AuthConfig((Tenant(TENANT_A, hash_token(ADMIN_A)), Tenant(TENANT_B, hash_token(ADMIN_B))))
#: Whose each job id is (FOREIGN: deleted, its id and snapshots stay tenant A's).
OWNERS = {REF: TENANT_A, UPL: TENANT_A, FOREIGN: TENANT_A, B_JOB: TENANT_B}

#: The JobService methods a worker token reaches (README "Security"); the others need an admin token.
WORKER_METHODS = frozenset({"GetJob", "JoinJob", "Heartbeat", "LeaveJob", "CreateSnapshot", "ListSnapshots", "ReadOptimizerState"})
JOB_METHODS = [m.name for m in JOB_SERVICE.methods]
SHARD_METHODS = [m.name for m in SHARD_SERVICE.methods]
#: Methods that may start shards or write snapshots (their deadline, if one got through).
SLOW = {"CreateJob", "CreateSnapshot", "RollbackJob", "ReadOptimizerState", "DeleteJob"}

UNAUTH, DENIED, ALLOWED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK
REASONS = {UNAUTH: Reason.UNAUTHENTICATED, DENIED: Reason.PERMISSION_DENIED}

AUTH_EXAMPLES = max(4, EXAMPLES // 3)
AUTH_FUZZ = settings(FUZZ, max_examples=AUTH_EXAMPLES)
GATE_FUZZ = settings(FUZZ, max_examples=5 * EXAMPLES)

# ---- the rules -------------------------------------------------------------------------------------

#: "authorization: Bearer TOKEN": the scheme in any case, a space, the token (1 to MAX_TOKEN_CHARS
#: printable ASCII characters), only spaces and tabs (HTTP's white space) around.
BEARER = re.compile(r"[ \t]*[Bb][Ee][Aa][Rr][Ee][Rr] [ \t]*([\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)[ \t]*")


def as_received(value: str | bytes) -> str:
    """A header value as a Python gRPC server hands it to the service: its bytes as UTF-8, or as
    Latin-1 when they are not UTF-8."""
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def presented_token(entries: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The token the first ``authorization`` entry presents, or None (none, or malformed)."""
    for key, value in entries:
        if key == "authorization":
            m = BEARER.fullmatch(as_received(value))
            return m.group(1) if m is not None and len(m.group(1)) <= MAX_TOKEN_CHARS else None
    return None


@dataclass(frozen=True)
class Live:
    """The credentials the service accepts when a case runs."""

    workers: Mapping[str, str]
    """Each job's live worker token."""
    retired: str
    """A worker token of REF that a rotation retired."""

    def token(self, name: str, target: str) -> str:
        """A token by name; "target": the worker token of the job the call is about."""
        if name == "admin-a":
            return ADMIN_A
        if name == "admin-b":
            return ADMIN_B
        if name == "retired":
            return self.retired
        job = target if name == "target" else name.removeprefix("worker:")
        return self.workers.get(job, "")

    def identity(self, token: str) -> tuple[str, str] | None:
        """("admin", tenant) or ("worker", job) for a token the service accepts, else None."""
        if token == ADMIN_A:
            return "admin", TENANT_A
        if token == ADMIN_B:
            return "admin", TENANT_B
        return next((("worker", job) for job, t in self.workers.items() if t == token), None)


def expect_front_door(live: Live, method: str, job_id: str, token: str | None) -> grpc.StatusCode:
    """The front door's answer (README "Security"): no or an unknown token is UNAUTHENTICATED; a
    worker token outside its job's worker calls, or an admin token on another tenant's job, is
    PERMISSION_DENIED; anything else reaches the method (ALLOWED)."""
    who = None if token is None else live.identity(token)
    if who is None:
        return UNAUTH
    kind, name = who
    if kind == "worker":
        return DENIED if method not in WORKER_METHODS or (job_id and job_id != name) else ALLOWED
    owner = OWNERS.get(job_id)
    return DENIED if method != "ListJobs" and job_id and owner is not None and owner != name else ALLOWED


def expect_shard(live: Live, job: str, token: str | None) -> grpc.StatusCode:
    """A shard port's answer: the job's worker token passes; a token of another job's form
    (``psj.OTHER.SECRET``) is PERMISSION_DENIED (a shard knows only its own job's tokens, so it
    cannot tell a forged one from a real one); anything else is UNAUTHENTICATED (admin tokens too)."""
    if token is None:
        return UNAUTH
    if token == live.workers.get(job):
        return ALLOWED
    named, dot, secret = token.removeprefix("psj.").rpartition(".")
    return DENIED if token.startswith("psj.") and dot and named and secret and named != job else UNAUTH


# ---- credentials -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tok:
    """A token known when the case runs (see Live.token), with string edits applied in order."""

    name: str
    ops: tuple[tuple[Any, ...], ...] = ()

    def resolve(self, live: Live, target: str) -> str:
        token = live.token(self.name, target)
        for op in self.ops:
            token = edit_token(token, op)
        return token


def edit_token(token: str, op: tuple[Any, ...]) -> str:
    kind, n = op[0], len(token)
    if kind == "flip" and n:
        i = op[1] % n
        return token[:i] + str(op[2]) + token[i + 1 :]
    if kind == "truncate":
        return token[: op[1] % (n + 1)]
    if kind == "append":
        return token + str(op[1])
    if kind == "insert":
        i = op[1] % (n + 1)
        return token[:i] + str(op[2]) + token[i:]
    if kind == "delete" and n:
        i = op[1] % n
        return token[:i] + token[i + op[2] :]
    if kind == "case" and n:
        i = op[1] % n
        return token[:i] + token[i].swapcase() + token[i + 1 :]
    if kind == "job":  # the same secret under another job's name
        _, dot, secret = token.removeprefix("psj.").rpartition(".")
        return f"psj.{op[1]}.{secret if dot else token}"
    if kind == "pad":
        return token + "A" * max(0, int(op[1]) - n)
    return token


#: A header value: pieces joined; bytes pieces (or characters a gRPC client refuses) make it raw.
Pieces = tuple[str | bytes | Tok, ...]


@dataclass(frozen=True)
class CredCase:
    """Metadata entries (key, pieces) of one kind of credential."""

    kind: str
    entries: tuple[tuple[str, Pieces], ...]


def render(pieces: Pieces, live: Live, target: str, key: str = "authorization") -> str | bytes:
    """The value: a str when a gRPC client can send it, else the raw bytes (at least
    MIN_RAW_HEADER of them: shorter ones get leading spaces, which the rules ignore)."""
    parts = [p.resolve(live, target) if isinstance(p, Tok) else p for p in pieces]
    if key.endswith("-bin"):
        return b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)
    if all(isinstance(p, str) and all(" " <= c <= "~" for c in p) for p in parts):
        return "".join(str(p) for p in parts)
    raw = b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)
    return raw.rjust(MIN_RAW_HEADER)


PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
NAMES = ["admin-a", "admin-b", "worker:" + REF, "worker:" + UPL, "worker:" + B_JOB, "retired", "target"]
SCHEMES = ["Bearer ", "bearer ", "BEARER  ", " Bearer ", "Bearer", "Basic ", "Token ", "", "Bearer: ", "Bearer=", "Beare ", "Bearer-"]
#: Bytes a gRPC client refuses in a header value: controls, DEL, Latin-1, UTF-8 of white space
#: (NEL, NBSP, EM SPACE, IDEOGRAPHIC SPACE, BOM), a UTF-8 surrogate, é.
RAW_BITS = [b"\x00", b"\t", b"\x0b", b"\x0c", b"\r\n", b"\x1c", b"\x1f", b"\x7f", b"\x85", b"\xa0", b"\xff", b"\xc2\x85", b"\xc2\xa0",
            b"\xe2\x80\x83", b"\xe3\x80\x80", b"\xef\xbb\xbf", b"\xed\xa0\x80", "é".encode()]  # fmt: skip

token_ops: st.SearchStrategy[tuple[Any, ...]] = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 600), PRINTABLE),
    st.tuples(st.just("truncate"), st.integers(0, 600)),
    st.tuples(st.just("append"), st.text(PRINTABLE, min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.integers(0, 600), st.text(PRINTABLE, min_size=1, max_size=4)),
    st.tuples(st.just("delete"), st.integers(0, 600), st.integers(1, 8)),
    st.tuples(st.just("case"), st.integers(0, 600)),
    st.tuples(st.just("job"), st.sampled_from([REF, UPL, B_JOB, FOREIGN, "nope", "", "ref.x", "ref "])),
)
toks = st.builds(Tok, st.sampled_from(NAMES))
mutated = st.builds(Tok, st.sampled_from(NAMES), st.lists(token_ops, min_size=1, max_size=3).map(tuple))
raw_bits = st.sampled_from(RAW_BITS)


def auth_entry(pieces: st.SearchStrategy[Pieces]) -> st.SearchStrategy[tuple[tuple[str, Pieces], ...]]:
    return pieces.map(lambda p: (("authorization", p),))


garbled = st.tuples(st.sampled_from(SCHEMES), st.text(PRINTABLE, max_size=80))
bad_values: st.SearchStrategy[Pieces] = st.one_of(garbled, st.tuples(st.just("Bearer "), mutated))

cred_cases: st.SearchStrategy[CredCase] = st.one_of(
    st.builds(
        CredCase,
        st.just("missing"),
        st.sampled_from(
            [
                (),
                (("x-token", ("Bearer ", Tok("target"))),),
                (("authorisation", ("Bearer ", Tok("target"))),),
                (("authorization-bin", (b"Bearer ", Tok("target"))),),
            ]
        ),
    ),
    st.builds(CredCase, st.just("garbled"), auth_entry(garbled)),
    st.builds(CredCase, st.just("scheme"), auth_entry(st.tuples(st.sampled_from(SCHEMES), toks))),
    st.builds(CredCase, st.just("mutated"), auth_entry(st.tuples(st.just("Bearer "), mutated))),
    st.builds(
        CredCase,
        st.just("oversized"),
        auth_entry(
            st.one_of(
                st.tuples(
                    st.just("Bearer "),
                    st.builds(Tok, st.sampled_from(NAMES), st.integers(MAX_TOKEN_CHARS + 1, 4000).map(lambda n: (("pad", n),))),
                ),
                st.tuples(st.just("Bearer "), st.integers(MAX_TOKEN_CHARS + 1, 4000).map(lambda n: "x" * n)),
            )
        ),
    ),
    st.builds(
        CredCase,
        st.just("raw bytes"),
        auth_entry(
            st.one_of(
                st.tuples(
                    st.one_of(st.just(b""), raw_bits),
                    st.sampled_from(SCHEMES),
                    st.one_of(st.just(b""), raw_bits),
                    st.one_of(toks, mutated),
                    raw_bits,
                ),
                st.tuples(st.just("Bearer "), st.one_of(toks, mutated), raw_bits, st.one_of(toks, st.just(""))),
                st.tuples(st.binary(max_size=120)),
                st.tuples(st.just("Bearer "), st.text(min_size=1, max_size=40)),
            )
        ),
    ),
    st.builds(CredCase, st.just("another credential"), auth_entry(st.tuples(st.just("Bearer "), toks))),
    st.builds(
        CredCase,
        st.just("two entries"),
        st.tuples(bad_values, st.tuples(st.just("Bearer "), toks)).map(lambda t: (("authorization", t[0]), ("authorization", t[1]))),
    ),
)


def cred(kind: str, *entries: tuple[str, Pieces]) -> CredCase:
    return CredCase(kind, entries)


#: One credential of each kind, tried on every method (those that would be allowed are skipped).
TABLE: dict[str, CredCase] = {
    "none": cred("missing"),
    "the token under another key": cred("missing", ("x-authorization", ("Bearer ", Tok("target")))),
    "the token as binary metadata": cred("missing", ("authorization-bin", (b"Bearer ", Tok("target")))),
    "an empty token": cred("garbled", ("authorization", ("Bearer ",))),
    "not a token": cred("garbled", ("authorization", ("Bearer not-a-token",))),
    "no scheme": cred("scheme", ("authorization", (Tok("target"),))),
    "the Basic scheme": cred("scheme", ("authorization", ("Basic ", Tok("admin-a")))),
    "a tab after the scheme": cred("raw bytes", ("authorization", ("Bearer", b"\t", Tok("target")))),
    "the admin token, one character changed": cred("mutated", ("authorization", ("Bearer ", Tok("admin-a", (("flip", 7, "#"),))))),
    "the worker token, one character more": cred("mutated", ("authorization", ("Bearer ", Tok("target", (("append", "x"),))))),
    "the worker token, cut short": cred("mutated", ("authorization", ("Bearer ", Tok("target", (("truncate", 20),))))),
    "another job's name on the worker token": cred("mutated", ("authorization", ("Bearer ", Tok("target", (("job", "nope"),))))),
    "an oversized token": cred("oversized", ("authorization", ("Bearer ", "x" * (MAX_TOKEN_CHARS + 1)))),
    "the worker token padded to 4000": cred("oversized", ("authorization", ("Bearer ", Tok("target", (("pad", 4000),))))),
    "the worker token and NBSP": cred("raw bytes", ("authorization", ("Bearer ", Tok("target"), b"\xc2\xa0"))),
    "the worker token and \\x1f": cred("raw bytes", ("authorization", ("Bearer ", Tok("target"), b"\x1f"))),
    "the admin token and \\xff": cred("raw bytes", ("authorization", ("Bearer ", Tok("admin-a"), b"\xff"))),
    "NUL in the worker token": cred("raw bytes", ("authorization", ("Bearer ", Tok("target", (("truncate", 9),)), b"\x00", Tok("target")))),
    "non-ASCII only": cred("raw bytes", ("authorization", (b"\xe2\x80\x83\xff\x00 Bearer \xc3\xa9",))),
    "a retired worker token": cred("another credential", ("authorization", ("Bearer ", Tok("retired")))),
    "ref's worker token": cred("another credential", ("authorization", ("Bearer ", Tok("worker:" + REF)))),
    "upl's worker token": cred("another credential", ("authorization", ("Bearer ", Tok("worker:" + UPL)))),
    "tenant B's worker token": cred("another credential", ("authorization", ("Bearer ", Tok("worker:" + B_JOB)))),
    "tenant B's admin token": cred("another credential", ("authorization", ("Bearer ", Tok("admin-b")))),
    "tenant A's admin token": cred("another credential", ("authorization", ("Bearer ", Tok("admin-a")))),
    "the job's own worker token": cred("another credential", ("authorization", ("Bearer ", Tok("target")))),
    "a bad entry, then the job's token": cred(
        "two entries", ("authorization", ("Bearer bad",)), ("authorization", ("Bearer ", Tok("target")))
    ),
}


# ---- the secured service ---------------------------------------------------------------------------


class AuthFuzz(FuzzService):
    """The fuzz tier's service with credentials on (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, auth=TENANTS, admin_token=ADMIN_A)
        self.retired = ""
        self.b_member = (0, 0)

    async def secure(self) -> None:
        """Retire REF's first worker token (RotateJobToken, no grace), and give tenant B a job with
        a member and its parameters."""
        req = jpb.RotateJobTokenRequest(request_id=uuid.uuid4().hex, job_id=REF, previous_valid_s=0.0)
        rotated = await self.job_call("RotateJobToken", req)
        self.retired, self.worker_tokens[REF] = self.worker_tokens[REF], rotated.worker_token
        job = await self._create(B_JOB, [("x", (6,))], token=ADMIN_B, num_workers=1, num_shards=1)
        self.b_member = await self.join(B_JOB, "b")
        await self.upload(job, np.arange(6, dtype=np.float32))
        await self.refresh()
        self.baseline = await self.observe()

    async def refresh(self) -> None:
        await super().refresh()
        if B_JOB in self.svc.coordinator.jobs:
            self.ctx["jobs"][B_JOB] = await self.job_call("GetJob", jpb.GetJobRequest(job_id=B_JOB), token=ADMIN_B)

    def live(self) -> Live:
        return Live(dict(self.worker_tokens), self.retired)

    async def b_still_trains(self) -> None:
        """Tenant B's job takes a step (its member pushes, the version moves)."""
        job: jpb.Job = await self.job_call("GetJob", jpb.GetJobRequest(job_id=B_JOB), token=ADMIN_B)
        outs = await self.step(job, [self.b_member], seed=11)
        assert spb.PushGradientsResponse.FromString(outs[-1].responses[0]).outcome == spb.STEP_OUTCOME_APPLIED
        after = await self.job_call("GetJob", jpb.GetJobRequest(job_id=B_JOB), token=ADMIN_B)
        assert after.version == job.version + 1

    def metadata(self, entries: Sequence[tuple[str, str | bytes]]) -> tuple[Metadata, bool]:
        """The entries as a gRPC client sends them (raw values as relay placeholders), and
        whether the call must go through the relay."""
        out: list[tuple[str, str | bytes]] = []
        relay = False
        for key, value in entries:
            if isinstance(value, bytes) and not key.endswith("-bin"):
                value, relay = self.raw_header(value), True
            out.append((key, value))
        return out, relay


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthFuzz]:
    """The module's secured service; at the end both tenants' jobs must still train."""
    env = AuthFuzz(tmp_path_factory.mktemp("fuzz-auth"))
    try:
        env.run(env.start())
        env.run(env.secure())
        yield env
        env.run(env.still_trains())
        env.run(env.b_still_trains())
    finally:
        try:
            env.run(env.close(), timeout=60)
        finally:
            env.loop.close()


# ---- cases -----------------------------------------------------------------------------------------


def check_refusal(what: str, out: Outcome, expected: grpc.StatusCode) -> None:
    assert out.code == expected, f"{what}: expected {expected.name}, got {out}"
    if expected != ALLOWED:
        assert out.reason == REASONS[expected], f"{what}: expected reason {REASONS[expected]}, got {out}"


def front_door_case(auth: AuthFuzz, method: str, request: Message, cred: CredCase, skip: Callable[[], None]) -> None:
    """One JobService call with `cred`; `skip` is called instead for a credential that authorizes
    it (but for another tenant's ListJobs, which lists that tenant's jobs only)."""
    m = JOB_SERVICE.methods_by_name[method]
    job_id = str(getattr(request, "job_id", ""))
    live = auth.live()
    entries = [(key, render(p, live, job_id or REF, key)) for key, p in cred.entries]
    expected = expect_front_door(live, method, job_id, presented_token(entries))
    if expected == ALLOWED and method != "ListJobs":
        skip()
        return
    md, relay = auth.metadata(entries)
    raw = request.SerializeToString()

    async def send() -> Outcome:
        address = await auth.relayed(auth.svc.address) if relay else auth.svc.address
        return await auth.unary(address, method_path(m), raw, SLOW_S if method in SLOW else CALL_S, m.server_streaming, md)

    out = auth.case(f"Auth/JobService.{method}", f"auth:{cred.kind}", send, read_only=True)
    check_refusal(f"JobService.{method} with {cred} ({entries!r:.300})", out, expected)
    if expected == ALLOWED:  # an admin lists its own tenant's jobs only
        tenant = next(t for t in (TENANT_A, TENANT_B) if live.identity(presented_token(entries) or "") == ("admin", t))
        listed = {j.job_id for j in jpb.ListJobsResponse.FromString(out.responses[0]).jobs}
        assert all(OWNERS.get(j, tenant) == tenant for j in listed), (tenant, listed)


def shard_case(
    auth: AuthFuzz, method: str, job: str, shard: int, plan: Plan, cover: Cover, cred: CredCase, skip: Callable[[], None]
) -> None:
    """One ShardService call to a shard of `job` (a stream: its header `plan` and `cover`'s chunks;
    a pull: the request `plan`) with `cred`."""
    m = SHARD_SERVICE.methods_by_name[method]
    live = auth.live()
    entries = [(key, render(p, live, job, key)) for key, p in cred.entries]
    expected = expect_shard(live, job, presented_token(entries))
    if expected == ALLOWED:
        skip()
        return
    md, relay = auth.metadata(entries)
    ctx = auth.case_ctx(job, shard)
    if m.client_streaming:
        request_desc, header_desc = STREAMS[method]
        messages = materialize(StreamCase(plan, cover, [], []), request_desc, header_desc, ctx, ctx["spans"])
    else:
        raw = build(m.input_type, plan, ctx).SerializeToString()

    async def send() -> Outcome:
        address = await auth.relayed(ctx["address"]) if relay else ctx["address"]
        if m.client_streaming:
            return await auth.client_stream(address, method_path(m), messages, CALL_S, md)
        return await auth.unary(address, method_path(m), raw, CALL_S, True, md)

    out = auth.case(f"Auth/ShardService.{method}", f"auth:{cred.kind}", send, read_only=True)
    check_refusal(f"ShardService.{method} on {job} shard {shard} with {cred} ({entries!r:.300})", out, expected)


def fixed_request(auth: AuthFuzz, method: str) -> Message:
    """A well-formed request of `method` on REF (a CreateJob of REF's id)."""
    if method == "CreateJob":
        spec = make_spec(SHAPES, optimizer="adamw", hyperparameters=HYPER, num_workers=1, num_shards=1)
        return jpb.CreateJobRequest(request_id=uuid.uuid4().hex, job_id=REF, spec=spec)
    m = JOB_SERVICE.methods_by_name[method]
    msg = message_factory.GetMessageClass(m.input_type)()
    ctx = auth.case_ctx()
    second = method == "LeaveJob"  # the observer that may leave; the other one pushes and pulls
    values = {
        "request_id": uuid.uuid4().hex,
        "job_id": REF,
        "worker_name": "intruder",
        "previous_valid_s": 60.0,
        "snapshot": ctx["snapshot"],
        "worker_id": ctx["worker_id2" if second else "worker_id"],
        "lease": ctx["lease2" if second else "lease"],
    }
    for name in msg.DESCRIPTOR.fields_by_name:
        if name in values and not (method == "ReadOptimizerState" and name == "snapshot"):
            setattr(msg, name, values[name])
    return msg


STREAMS = {
    "PushGradients": (spb.PushGradientsRequest.DESCRIPTOR, spb.PushHeader.DESCRIPTOR),
    "UploadParameters": (spb.UploadParametersRequest.DESCRIPTOR, spb.UploadHeader.DESCRIPTOR),
}
#: Fixed shard plans: a push of REF's observer, an upload, a pull (see strategies.VALID).
SHARD_PLANS: dict[str, Plan] = {
    "PushGradients": [("job_id", Ref("job")), ("worker_id", Ref("worker_id")), ("step", Ref("version")), ("request_id", Ref("request_id")),
                      ("loss_terms", 1), ("lease", Ref("lease")), ("generation", Ref("generation"))],
    "UploadParameters": [("job_id", Ref("job")), ("request_id", Ref("request_id"))],
    "PullParameters": [("job_id", Ref("job")), ("min_version", Ref("version")), ("worker_id", Ref("worker_id")), ("lease", Ref("lease")),
                       ("generation", Ref("generation"))],
}  # fmt: skip
SHARD_VALID = {
    "PushGradients": VALID["PushHeader"],
    "UploadParameters": VALID["UploadHeader"],
    "PullParameters": VALID["PullParametersRequest"],
}
#: The shards the table tries (each of tenant A's jobs, and tenant B's; hypothesis tries all).
TABLE_SHARDS = {"PushGradients": [(REF, 0), (B_JOB, 0)], "UploadParameters": [(UPL, 1), (B_JOB, 0)], "PullParameters": [(REF, 1), (UPL, 0)]}
ONE_COVER = Cover(pieces=2, dtype=FLOAT32, values="normal", seed=1, shuffle=False)


def skipping(cred: CredCase) -> Callable[[], None]:
    """What a table case that the credential authorizes does: it is not sent; only a valid
    credential, unchanged, may authorize a call (any other kind that does is a broken table)."""

    def skip() -> None:
        assert cred.kind == "another credential", f"a table credential that should be refused authorizes the call: {cred}"

    return skip


@TIMEOUT
@pytest.mark.parametrize("method", JOB_METHODS)
def test_every_kind_of_credential_on_the_front_door(auth: AuthFuzz, method: str) -> None:
    for cred in TABLE.values():
        front_door_case(auth, method, fixed_request(auth, method), cred, skipping(cred))


@TIMEOUT
@pytest.mark.parametrize("method", SHARD_METHODS)
def test_every_kind_of_credential_on_the_shards(auth: AuthFuzz, method: str) -> None:
    for job, shard in TABLE_SHARDS[method]:
        for cred in TABLE.values():
            shard_case(auth, method, job, shard, SHARD_PLANS[method], ONE_COVER, cred, skipping(cred))


def skip_example() -> None:
    assume(False)


@TIMEOUT
@pytest.mark.parametrize("method", JOB_METHODS)
@AUTH_FUZZ
@given(data=st.data())
def test_front_door_credentials(auth: AuthFuzz, method: str, data: st.DataObject) -> None:
    m = JOB_SERVICE.methods_by_name[method]
    plan = data.draw(VALID.get(m.input_type.name, st.just([])), label="request")
    cred = data.draw(cred_cases, label="credentials")
    front_door_case(auth, method, build(m.input_type, plan, auth.case_ctx()), cred, skip_example)


@TIMEOUT
@pytest.mark.parametrize("method", SHARD_METHODS)
@AUTH_FUZZ
@given(job=st.sampled_from([REF, UPL, B_JOB]), shard=st.integers(0, 3), cover=covers, data=st.data())
def test_shard_credentials(auth: AuthFuzz, method: str, job: str, shard: int, cover: Cover, data: st.DataObject) -> None:
    plan = data.draw(SHARD_VALID[method], label="request")
    cred = data.draw(cred_cases, label="credentials")
    shard_case(auth, method, job, shard, plan, cover, cred, skip_example)


def test_metadata_over_grpcs_limit_is_refused_by_grpc_and_changes_nothing(auth: AuthFuzz) -> None:
    """An ``authorization`` value over gRPC's hard limit on metadata (16 KiB) never reaches the
    service: gRPC answers RESOURCE_EXHAUSTED itself (no ErrorInfo: no service code ran)."""
    live = auth.live()
    md = [("authorization", "Bearer " + live.token("target", REF) + "x" * 20000)]
    targets = [("JobService.GetJob", auth.svc.address, method_path(JOB_SERVICE.methods_by_name["GetJob"]), fixed_request(auth, "GetJob"))]
    ctx = auth.case_ctx(REF, 0)
    pull = build(SHARD_SERVICE.methods_by_name["PullParameters"].input_type, SHARD_PLANS["PullParameters"], ctx)
    targets.append(("ShardService.PullParameters", ctx["address"], method_path(SHARD_SERVICE.methods_by_name["PullParameters"]), pull))
    for name, address, path, request in targets:
        out = auth.run(auth.unary(address, path, request.SerializeToString(), CALL_S, name.endswith("Parameters"), md))
        record(f"Auth/{name}", "auth:over gRPC's metadata limit", out)
        assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata" in out.message, out
        assert_same(auth.baseline, auth.run(auth.observe()), f"{name} with 20 KB of metadata")


def test_a_failing_check_refuses_with_internal_and_a_reason(auth: AuthFuzz, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in either gate's check refuses the call (INTERNAL, INTERNAL_ERROR), never passes it
    and never quotes the exception (whose text might hold a token)."""
    secret = auth.live().token("target", REF)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"a bug that quotes {secret}")

    async def aboom(*args: Any, **kwargs: Any) -> Any:
        boom()

    monkeypatch.setattr(FrontDoorGate, "check", aboom)
    monkeypatch.setattr(ShardGate, "refusal", boom)
    md = [("authorization", f"Bearer {secret}")]
    ctx = auth.case_ctx(REF, 0)
    calls = [
        ("JobService.GetJob", auth.svc.address, JOB_SERVICE.methods_by_name["GetJob"], fixed_request(auth, "GetJob").SerializeToString()),
        ("ShardService.PullParameters", ctx["address"], SHARD_SERVICE.methods_by_name["PullParameters"],
         build(SHARD_SERVICE.methods_by_name["PullParameters"].input_type, SHARD_PLANS["PullParameters"], ctx).SerializeToString()),
    ]  # fmt: skip
    for name, address, m, raw in calls:
        out = auth.run(auth.unary(address, method_path(m), raw, CALL_S, m.server_streaming, md))
        assert (out.code, out.reason) == (grpc.StatusCode.INTERNAL, Reason.INTERNAL_ERROR), f"{name}: {out}"
        assert secret not in out.message and "RuntimeError" not in out.message, out
    messages = [spb.PushGradientsRequest(header=spb.PushHeader(job_id=REF)).SerializeToString()]
    out = auth.run(auth.client_stream(ctx["address"], method_path(SHARD_SERVICE.methods_by_name["PushGradients"]), messages, CALL_S, md))
    assert (out.code, out.reason) == (grpc.StatusCode.INTERNAL, Reason.INTERNAL_ERROR), out
    monkeypatch.undo()
    assert_same(auth.baseline, auth.run(auth.observe()), "calls refused by a failing check")


# ---- the gates alone -------------------------------------------------------------------------------

GATE_WORKERS = {REF: "psj.ref.live-secret", UPL: "psj.upl.other-secret", B_JOB: "psj.b-job.b-secret"}
GATE_LIVE = Live(GATE_WORKERS, "psj.ref.retired-secret")


async def gate_lookup(job_id: str) -> tuple[str, Tokens]:
    """What the coordinator answers: a job's tenant and tokens (the retired one expired), NOT_FOUND."""
    if job_id == FOREIGN:
        return TENANT_A, ()
    if job_id not in GATE_WORKERS:
        raise ParamServerError.not_found(Reason.JOB_NOT_FOUND, f"no job {job_id!r}", job_id=job_id)
    expired = ((hash_token(GATE_LIVE.retired), 1.0),) if job_id == REF else ()
    return OWNERS[job_id], (*expired, (hash_token(GATE_WORKERS[job_id]), 0.0))


def roster_of(job: str) -> Roster:
    return Roster(epoch=1, tokens=((hash_token(GATE_WORKERS[job]), 0.0),), secured=True)


#: Server-side metadata values: any text (a Python server decodes non-UTF-8 bytes as Latin-1).
well_formed: st.SearchStrategy[Pieces] = st.tuples(
    st.sampled_from(["Bearer ", "bearer ", "BEARER  ", " Bearer ", "\tBearer \t"]), toks, st.sampled_from(["", " ", "\t", " \t "])
)
server_values: st.SearchStrategy[Pieces] = st.one_of(
    well_formed,
    well_formed,
    well_formed,
    bad_values,
    st.tuples(
        st.sampled_from(SCHEMES), st.one_of(toks, mutated), st.sampled_from(["", " ", "\t", *(b.decode("latin-1") for b in RAW_BITS)])
    ),
    st.tuples(st.sampled_from(["Bearer ", "bearer "]), st.text(max_size=40)),
    st.tuples(st.text(max_size=60)),
)


@GATE_FUZZ
@given(
    method=st.sampled_from(JOB_METHODS),
    job_id=st.sampled_from(["", REF, UPL, B_JOB, FOREIGN, "nope"]),
    shard_job=st.sampled_from([REF, UPL, B_JOB]),
    target=st.sampled_from([REF, UPL, B_JOB]),
    before=st.lists(st.tuples(st.sampled_from(["x-other", "authorisation", "authorization-bin"]), server_values), max_size=2),
    first=st.one_of(well_formed, server_values),
    after=st.lists(st.tuples(st.sampled_from(["authorization", "x-other"]), server_values), max_size=2),
)
def test_the_gates_answer_by_the_rules(
    method: str, job_id: str, shard_job: str, target: str, before: list[tuple[str, Pieces]], first: Pieces,
    after: list[tuple[str, Pieces]],
) -> None:  # fmt: skip
    """FrontDoorGate.check and ShardGate.refusal, called directly with metadata as a server hands
    it over (any text; bytes under a -bin key): a caller, or UNAUTHENTICATED / PERMISSION_DENIED
    exactly as the rules say; nothing else is raised."""
    md: list[tuple[str, str | bytes]] = []
    for key, pieces in [*before, ("authorization", first), *after]:
        value = render(pieces, GATE_LIVE, target, key)
        md.append((key, value if key.endswith("-bin") else as_received(value)))
    token = presented_token(md)
    if "job_id" not in JOB_SERVICE.methods_by_name[method].input_type.fields_by_name:  # ListJobs
        job_id = ""
    gate = FrontDoorGate(TENANTS, gate_lookup)
    try:  # the gate leaves CreateJob's job id to the coordinator (whose owner the end-to-end cases check)
        asyncio.run(gate.check(method, SimpleNamespace(job_id=job_id), md))
        front: grpc.StatusCode = ALLOWED
    except ParamServerError as err:
        front = getattr(grpc.StatusCode, err.code)
        assert err.reason == REASONS.get(front), err
    expected = expect_front_door(GATE_LIVE, method, "" if method == "CreateJob" else job_id, token)
    assert front == expected, f"front door: {md!r:.400} -> {front.name}, the rules say {expected.name}"
    refusal = ShardGate(shard_job, lambda: roster_of(shard_job), "s").refusal(md)
    shard = ALLOWED if refusal is None else getattr(grpc.StatusCode, refusal.code)
    assert refusal is None or refusal.reason == REASONS.get(shard), refusal
    expected = expect_shard(GATE_LIVE, shard_job, token)
    assert shard == expected, f"shard: {md!r:.400} -> {shard.name}, the rules say {expected.name}"
    record("Gate/front door", "gate", Outcome(front, reason=REASONS.get(front, ""), has_status=True))
    record("Gate/shard", "gate", Outcome(shard, reason=REASONS.get(shard, ""), has_status=True))


def test_the_gate_fuzzing_has_every_kind_of_credential() -> None:
    """Sanity of the table: every kind the strategies draw is in it."""
    assert {c.kind for c in TABLE.values()} == {
        "missing", "garbled", "scheme", "mutated", "oversized", "raw bytes", "another credential", "two entries"
    }  # fmt: skip


def test_undecodable_bytes_without_credentials_are_unauthenticated(auth: AuthFuzz) -> None:
    out = auth.run(auth.unary(auth.svc.address, method_path(JOB_SERVICE.methods_by_name["GetJob"]), b"\xff", CALL_S))
    record("Auth/JobService.GetJob", "auth:missing, undecodable request", out)
    assert (out.code, out.reason) == (UNAUTH, Reason.UNAUTHENTICATED), out


@pytest.mark.parametrize("token", ["short", "x" * (MAX_TOKEN_CHARS + 1), "an-admin-token-with-é-0123", "an-admin-token\twith-a-tab-0123"])
def test_an_admin_token_no_client_could_present_is_refused_at_startup(token: str) -> None:
    with pytest.raises(ValueError, match="admin token"):
        AuthConfig.single(token)
    assert AuthConfig.single("printable ASCII, spaces too: ~!@#").admin("printable ASCII, spaces too: ~!@#") is not None
