"""Compressed pushes (int8 / int4 blockwise, top-k; tensor.proto): the service decodes each chunk to
fp32 and sums exactly as for a dense push, so a step equals torch on the decoded gradients, bit
for bit; uploads and top-k pulls refuse compressed dtypes; int8/int4 pulls are the shard's
broadcast; error feedback carries what was dropped."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc import aio

from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import Reason, ServiceError
from paramserver_client.codec import COMPRESSED, FLOAT32, INT4_BLOCK, INT8_BLOCK, TOPK, encode_chunk_message
from paramserver_client.compression import ErrorFeedback, encode_pieces
from paramserver_client.errors import from_rpc_error
from tests.service.harness import InProcessService, assert_same_tensors, torch_adamw

# 3 shards over 1300 elements: shard ranges that do not start on 256-element block boundaries
SHAPES = [("w", (40, 30)), ("b", (100,))]
TOTAL = 1300
HYPER = {"lr": 0.01}


def grad(step: int, worker: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(10 * step + worker)
    return (rng.standard_normal(TOTAL) * (1 + worker)).astype(np.float32), 3 + worker


@pytest.mark.asyncio
@pytest.mark.parametrize("dtype", [INT8_BLOCK, INT4_BLOCK, TOPK], ids=lambda d: COMPRESSED[d])
async def test_a_compressed_push_is_summed_as_its_decoded_values(svc: InProcessService, dtype: int) -> None:
    """Worker 0 pushes compressed (with error feedback), worker 1 fp32: every step equals torch
    AdamW on (decoded_0 + grad_1) / (n_0 + n_1), bit for bit; the wire carried fewer bytes."""
    job = f"cmp-{COMPRESSED[dtype]}"
    await svc.create(SHAPES, job, optimizer="adamw", hyperparameters=HYPER, num_workers=2, num_shards=3)
    w0, w1 = await svc.join(job, 2)
    init = np.linspace(-1, 1, TOTAL, dtype=np.float32)
    await w0.upload(init)
    ratio = 0.1 if dtype == TOPK else None
    feedback = ErrorFeedback(TOTAL)
    mirror = ErrorFeedback(TOTAL)  # what worker 0's pushes decode to, computed here alike
    steps = []
    for step in range(3):
        (g0, n0), (g1, n1) = grad(step, 0), grad(step, 1)
        _, decoded = mirror.compress_pieces(g0, COMPRESSED[dtype], w0.pieces(dtype), ratio=ratio)
        assert not np.array_equal(decoded, g0)  # lossy: the test would see a decoding error
        before = w0.bytes_pushed
        assert (await w0.push(step, g0, n0, dtype=dtype, feedback=feedback, topk_ratio=ratio)).outcome == spb.STEP_OUTCOME_PENDING
        assert w0.bytes_pushed - before < TOTAL * 4 * (0.6 if dtype == TOPK else 0.35)
        assert (await w1.push(step, g1, n1)).outcome == spb.STEP_OUTCOME_APPLIED
        np.testing.assert_array_equal(feedback.residual, mirror.residual)
        steps.append([(decoded, n0), (g1, n1)])
    _, got, _ = await w1.pull(3)
    assert np.array_equal(got, torch_adamw(SHAPES, init, HYPER, steps))


@pytest.mark.asyncio
async def test_uploads_and_pulls_refuse_compressed_dtypes(svc: InProcessService) -> None:
    job = await svc.create(SHAPES, "cmp-refused", optimizer="sgd", hyperparameters=HYPER, num_workers=1, num_shards=3)
    (w0,) = await svc.join("cmp-refused", 1)
    shard = job.shards[0]
    start, length = int(shard.ranges[0].start), int(shard.ranges[0].length)
    from paramserver_client.compression import encode_int8

    data = encode_int8(np.ones(length, dtype=np.float32))
    messages = [
        spb.UploadParametersRequest(header=spb.UploadHeader(job_id="cmp-refused", request_id="u")).SerializeToString(),
        encode_chunk_message(start, length, INT8_BLOCK, data),
    ]
    async with aio.insecure_channel(shard.address) as channel:
        upload = channel.stream_unary(
            "/paramserver.v1.ShardService/UploadParameters",
            request_serializer=None,
            response_deserializer=spb.UploadParametersResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            await upload(iter(messages), timeout=15)
    e = from_rpc_error(err.value)
    assert (e.code, e.reason, e.metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.DTYPE_UNSUPPORTED, "chunk.dtype")
    assert "for pushes" in e.message
    # nothing was stored: the real upload works, and a pull in top-k is refused
    await w0.upload(np.zeros(TOTAL, dtype=np.float32))
    before = await svc.tensors("cmp-refused")
    with pytest.raises(ServiceError) as pulled:
        await w0.pull(0, dtype=TOPK)
    assert (pulled.value.code, pulled.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.DTYPE_UNSUPPORTED)
    assert_same_tensors(before, await svc.tensors("cmp-refused"))
    version, values, _ = await w0.pull(0, dtype=FLOAT32)
    assert version == 0 and not values.any()


@pytest.mark.asyncio
async def test_feedback_is_only_for_compressed_pushes(svc: InProcessService) -> None:
    await svc.create(SHAPES, "cmp-args", optimizer="sgd", hyperparameters=HYPER, num_workers=1, num_shards=1)
    (w0,) = await svc.join("cmp-args", 1)
    await w0.upload(np.zeros(TOTAL, dtype=np.float32))
    with pytest.raises(ValueError, match="compressed"):
        await w0.push(0, *grad(0, 0), feedback=ErrorFeedback(TOTAL))
    with pytest.raises(ValueError, match="ratio"):
        await w0.push(0, *grad(0, 0), dtype=TOPK)  # top-k needs its ratio
    assert (await w0.push(0, *grad(0, 0), dtype=INT8_BLOCK)).outcome == spb.STEP_OUTCOME_APPLIED


@pytest.mark.asyncio
@pytest.mark.parametrize("dtype", [INT8_BLOCK, INT4_BLOCK], ids=lambda d: COMPRESSED[d])
async def test_a_compressed_pull_is_the_broadcast_update_with_error_feedback(svc: InProcessService, dtype: int) -> None:
    """The first compressed pull hands out the parameters whole (fp32); each later one, given
    the version the worker holds, an update to add: encode(parameters - broadcast) chunk by chunk,
    the broadcast moving by what it decodes to, so that every worker holds the same bits and they
    stay within one quantisation step of the parameters (no drift over steps). A base the shard
    did not move from gets the broadcast values whole."""
    job = f"bcast-{COMPRESSED[dtype]}"
    await svc.create(SHAPES, job, optimizer="adamw", hyperparameters=HYPER, num_workers=2, num_shards=3)
    w0, w1 = await svc.join(job, 2)
    init = np.linspace(-1, 1, TOTAL, dtype=np.float32)
    await w0.upload(init)
    version, held, _ = await w0.pull(0, dtype=dtype)
    assert version == 0 and np.array_equal(held, init)
    method, pieces = COMPRESSED[dtype], w0.pieces(dtype)
    qmax = {INT8_BLOCK: 127, INT4_BLOCK: 7}[dtype]
    for step in range(4):
        await asyncio.gather(w0.push(step, *grad(step, 0)), w1.push(step, *grad(step, 1)))
        _, exact, _ = await w1.pull(step + 1)
        _, decoded = encode_pieces(exact - held, pieces, method)
        before = w0.bytes_pulled
        version, got, _ = await w0.pull(step + 1, dtype=dtype, base=(step, held))
        assert version == step + 1
        assert np.array_equal(got, held + decoded)
        assert w0.bytes_pulled - before < TOTAL * 4 * (0.35 if dtype == INT8_BLOCK else 0.25)
        # another worker holding the same values gets the same bits
        _, other, _ = await w1.pull(step + 1, dtype=dtype, base=(step, held.copy()))
        assert np.array_equal(other, got)
        # a base the shard did not move from: the broadcast values whole, in fp32
        before = w1.bytes_pulled
        _, whole, _ = await w1.pull(step + 1, dtype=dtype, base=(step + 9, np.zeros(TOTAL, dtype=np.float32)))
        assert np.array_equal(whole, got) and w1.bytes_pulled - before >= TOTAL * 4
        # within one quantisation step (per 256-element block) of the update, whatever the step
        diff = np.abs(exact - held)
        for off, n in pieces:
            for b in range(off, off + n, 256):
                end = min(b + 256, off + n)
                assert np.abs(got[b:end] - exact[b:end]).max() <= diff[b:end].max() / qmax * 0.51 + 1e-7
        held = got


@pytest.mark.asyncio
async def test_a_compressed_pull_takes_the_whole_shard_at_the_train_point(svc: InProcessService) -> None:
    job = await svc.create(SHAPES, "bcast-bad", optimizer="sgd", hyperparameters=HYPER, num_workers=1, num_shards=2)
    (w0,) = await svc.join("bcast-bad", 1)
    await w0.upload(np.zeros(TOTAL, dtype=np.float32))
    shard = job.shards[0]
    request = spb.PullParametersRequest(
        job_id="bcast-bad", min_version=0, dtype=INT8_BLOCK, worker_id=0, lease=w0.lease, ranges=[shard.ranges[0]]
    )
    async with aio.insecure_channel(shard.address) as channel:
        call = channel.unary_stream("/paramserver.v1.ShardService/PullParameters", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            async for _ in call(request.SerializeToString(), timeout=15):
                pass
    e = from_rpc_error(err.value)
    assert (e.code, e.reason, e.metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "ranges")
    with pytest.raises(ValueError, match="base"):
        await w0.pull(0, base=(0, np.zeros(TOTAL, dtype=np.float32)))  # a base with an fp32 pull
