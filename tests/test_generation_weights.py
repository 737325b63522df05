"""Versioned weight sync: the wire encoding, atomic swaps, failures that change nothing, and the
client pushing to several replicas. Real servers on loopback, real tiny models."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from conftest import wait_for
from generation_helpers import reference_sample, request, running_server, stub_for
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from rpp_lightning.clients.generation import (
    GenerationClient,
    SamplingConfig,
    StaleWeightsError,
    WeightSyncError,
)
from rpp_lightning.generation.backend import SampleRow
from rpp_lightning.generation.server import GenerationLimits
from rpp_lightning.generation.transformers_backend import TransformersBackend
from rpp_lightning.proto import generation_pb2 as pb
from rpp_lightning.rpc.failures import FailurePolicy
from rpp_lightning.rpc.serving import StatusError
from rpp_lightning.weight_transport.wire import WeightsAssembler, iter_update_requests

PROMPTS = [[1, 30, 31, 32], [1, 70, 71]]
GREEDY = SamplingConfig(temperature=0, max_new_tokens=12, seed=0)


@pytest.fixture(scope="module")
def new_weights(tiny_lm_path, tmp_path_factory):
    """(state dict, saved model dir) of perturbed weights: what a trainer step would push."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("tiny-lm-v1")
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}, path


def greedy_tokens(client: GenerationClient, **kwargs) -> list[list[int]]:
    return [r.token_ids for r in client.generate(PROMPTS, GREEDY, **kwargs)]


# --- the wire encoding --------------------------------------------------------------------------


def test_encoding_round_trips_every_dtype_across_chunks() -> None:
    tensors = {
        "a": torch.randn(7, 13),
        "b": torch.randn(33).to(torch.bfloat16),
        "c": torch.randn(4, 4).half(),
        "d": torch.arange(10, dtype=torch.int64),
        "e": torch.tensor([True, False, True]),
        "f": torch.empty(0, 3),
        "g": torch.randn(3, 5).t(),  # not contiguous: sent in logical order
    }
    requests = list(iter_update_requests(tensors.items(), target_version=4, chunk_bytes=24))
    messages = [r.chunks.chunks for r in requests if r.WhichOneof("item") == "chunks"]
    assert sum(map(len, messages)) > len(tensors)  # the larger tensors are split up
    assert all(sum(len(chunk.data) for chunk in m) <= 24 for m in messages)
    assert any(len({chunk.name for chunk in m}) > 1 for m in messages)  # small ones share
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    update = WeightsAssembler(expected, current_version=3).assemble(requests)
    assert update.target_version == 4
    assert update.num_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, tensor in tensors.items():
        assert torch.equal(update.tensors[name], tensor), name


def test_a_small_model_travels_in_one_message_between_header_and_commit() -> None:
    tensors = {f"layer{i}.norm": torch.ones(64) for i in range(50)} | {"w": torch.randn(64, 64)}
    requests = list(iter_update_requests(tensors.items(), target_version=1))
    assert [r.WhichOneof("item") for r in requests] == ["header", "chunks", "commit"]
    assert len(requests[1].chunks.chunks) == len(tensors)


def _stream(*items) -> list[pb.UpdateWeightsRequest]:
    """Requests from (kind, fields) pairs; each "chunk" goes in a message of its own."""
    kinds = {"header": pb.WeightsHeader, "commit": pb.WeightsCommit}
    return [
        pb.UpdateWeightsRequest(chunks=pb.TensorChunks(chunks=[pb.TensorChunk(**fields)]))
        if kind == "chunk"
        else pb.UpdateWeightsRequest(**{kind: kinds[kind](**fields)})
        for kind, fields in items
    ]


F32 = pb.TENSOR_DTYPE_FLOAT32
HEADER = ("header", dict(target_version=1))


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (_stream(("commit", {})), "must start with a WeightsHeader"),
        (_stream(("header", dict(target_version=0))), "must be greater than the current"),
        (
            _stream(HEADER, ("chunk", dict(name="w", dtype=F32, shape=[2], data=b"\0" * 8))),
            "ended without a WeightsCommit",
        ),
        (
            _stream(
                HEADER,
                ("chunk", dict(name="w", dtype=F32, shape=[2], data=b"\0" * 4)),
                ("commit", dict(num_tensors=1, num_bytes=4)),
            ),
            "received 4 of 8 bytes",
        ),
        (
            _stream(HEADER, ("chunk", dict(name="w", dtype=F32, shape=[2], data=b"\0" * 12))),
            "chunks exceed the tensor's 8 bytes",
        ),
        (
            _stream(
                HEADER, ("chunk", dict(name="w", dtype=F32, shape=[2], offset=4, data=b"1234"))
            ),
            "chunk offset 4, expected 0",
        ),
        (
            _stream(
                HEADER,
                ("chunk", dict(name="w", dtype=F32, shape=[2], data=b"\0" * 8)),
                ("commit", dict(num_tensors=2, num_bytes=8)),
            ),
            "commit says 2 tensors",
        ),
        (
            _stream(HEADER, ("chunk", dict(name="w", dtype=0, shape=[2], data=b"\0" * 8))),
            "unknown dtype enum 0",
        ),
        (
            _stream(
                HEADER,
                ("chunk", dict(name="w", dtype=F32, shape=[2], data=b"\0" * 8)),
                ("chunk", dict(name="v", dtype=F32, shape=[1], data=b"\0" * 4)),
                ("chunk", dict(name="w", dtype=F32, shape=[2], data=b"\0" * 8)),
            ),
            "sent twice",
        ),
        (_stream(HEADER, ("commit", {})), "carries no tensors"),
    ],
)
def test_assembler_rejects_malformed_streams(stream, message) -> None:
    expected = {"w": (torch.float32, (2,)), "v": (torch.float32, (1,))}
    with pytest.raises(StatusError) as caught:
        WeightsAssembler(expected, current_version=0).assemble(stream)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.message


# --- updates on a real server -------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_push_changes_outputs_to_those_of_the_new_weights(tiny_lm_path, new_weights) -> None:
    state, new_dir = new_weights
    direct = TransformersBackend(str(new_dir), device="cpu")  # loaded directly, no server
    new_model = AutoModelForCausalLM.from_pretrained(new_dir).eval()
    rows = [SampleRow(p, 12, seed=0, temperature=0) for p in PROMPTS]
    with running_server(tiny_lm_path) as (server, _), GenerationClient([server.address]) as client:
        before = greedy_tokens(client)
        seeded = SamplingConfig(n=2, temperature=1.0, top_k=10, max_new_tokens=10, seed=5)
        client.push_weights(state, version=1)
        info = client.server_info()[0]
        after = client.generate(PROMPTS, GREEDY)
        sampled_after = client.generate(PROMPTS, seeded)
        same_seed_again = client.generate(PROMPTS, seeded)
    assert info.weights_version == 1 and client.version == 1
    assert {r.weights_version for r in after + sampled_after} == {1}
    assert [r.token_ids for r in after] != before
    assert [r.token_ids for r in after] == [r.token_ids for r in direct.generate(rows)]
    for rollout, prompt in zip(after, PROMPTS, strict=True):
        assert rollout.token_ids == reference_sample(new_model, prompt, 0, 12, temperature=0)[0]
    assert [r.token_ids for r in sampled_after] == [r.token_ids for r in same_seed_again]


@pytest.mark.timeout(90)
def test_failed_updates_leave_old_weights_and_version(tiny_lm_path, new_weights) -> None:
    state, _ = new_weights
    with running_server(tiny_lm_path) as (server, _), stub_for(server.address) as stub:
        with GenerationClient([server.address]) as client:
            before = greedy_tokens(client)

        def expect(stream, code, message):
            with pytest.raises(grpc.RpcError) as caught:
                stub.UpdateWeights(stream, timeout=30)
            codes = code if isinstance(code, set) else {code}
            assert caught.value.code() in codes, caught.value.details()
            assert message in caught.value.details()

        def broken():  # the trainer dies mid-stream
            for i, item in enumerate(iter_update_requests(state.items(), 1, chunk_bytes=4096)):
                if i == 10:
                    raise RuntimeError("trainer crashed")
                yield item

        # The client's gRPC library cancels the call; the server sees a broken-off stream.
        expect(broken(), {grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}, "")
        truncated = list(iter_update_requests(state.items(), 1))[:-1]  # no commit
        expect(iter(truncated), grpc.StatusCode.INVALID_ARGUMENT, "without a WeightsCommit")
        renamed = {**state, "model.not_a_layer.weight": torch.zeros(2)}
        expect(
            iter_update_requests(renamed.items(), 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown tensor name 'model.not_a_layer.weight'",
        )
        name = "model.layers.0.mlp.up_proj.weight"
        reshaped = {**state, name: state[name].t()}
        expect(
            iter_update_requests(reshaped.items(), 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"tensor '{name}': shape [32, 128] does not match the model's [128, 32]",
        )
        recast = {**state, name: state[name].half()}
        expect(
            iter_update_requests(recast.items(), 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dtype torch.float16 does not match the model's torch.float32",
        )
        expect(
            iter_update_requests(state.items(), 0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "target_version 0 must be greater than the current version 0",
        )

        assert stub.GetInfo(pb.GenerationInfoRequest()).weights_version == 0
        with GenerationClient([server.address]) as client:
            assert greedy_tokens(client) == before
            # A good update still works afterwards (cast by the client to the server's dtype).
            client.push_weights({k: v.half() for k, v in state.items()}, 2, dtype=torch.float32)
            assert greedy_tokens(client) != before


@pytest.mark.timeout(90)
def test_safetensors_dir_updates_are_confined_to_the_root(tiny_lm_path, new_weights, tmp_path):
    state, _ = new_weights
    root, outside = tmp_path / "root", tmp_path / "outside"
    for directory in (root / "step-1", outside):
        directory.mkdir(parents=True)
        save_file(state, str(directory / "model.safetensors"))
    (root / "escape").symlink_to(outside)
    limits = GenerationLimits(weights_root=str(root))
    with (
        running_server(tiny_lm_path, limits) as (server, _),
        GenerationClient([server.address]) as client,
    ):
        before = greedy_tokens(client)
        for bad, message in [
            (str(outside), "is outside the allowed root"),
            (str(root / "step-1" / ".." / ".." / "outside"), "is outside the allowed root"),
            (str(root / "escape"), "is outside the allowed root"),
            (str(root / "missing"), "is not a directory"),
        ]:
            with pytest.raises(WeightSyncError, match="INVALID_ARGUMENT") as caught:
                client.push_weights_from_dir(bad, version=1)
            assert message in str(caught.value)
        assert client.server_info()[0].weights_version == 0
        client.push_weights_from_dir(str(root / "step-1"), version=1)
        assert client.server_info()[0].weights_version == 1
        assert greedy_tokens(client) != before
    with (
        running_server(tiny_lm_path) as (server, _),
        GenerationClient([server.address]) as client,
        pytest.raises(WeightSyncError, match="started without --weights-root"),
    ):
        client.push_weights_from_dir(str(root / "step-1"), version=1)


@pytest.mark.timeout(120)
def test_generation_during_an_update_is_never_a_mix(tiny_lm_path, new_weights) -> None:
    state, _ = new_weights
    with running_server(tiny_lm_path) as (server, _), GenerationClient([server.address]) as client:
        old = greedy_tokens(client)
        with stub_for(server.address) as stub:
            replies: list[pb.GenerateResponse] = []
            stop = threading.Event()

            def hammer():
                while not stop.is_set():
                    replies.append(
                        stub.Generate(request(PROMPTS, temperature=0, max_new_tokens=12))
                    )

            threads = [threading.Thread(target=hammer) for _ in range(3)]
            for thread in threads:
                thread.start()
            try:
                # the push must meet requests in flight: wait for the hammers' first reply (on
                # a loaded machine the threads may take longer to start than the push takes)
                assert wait_for(lambda: len(replies) > 0, timeout_s=30)
                client.push_weights(state, version=1)
                new = greedy_tokens(client)
                # let a few requests land on the new version
                assert wait_for(lambda: any(r.weights_version == 1 for r in replies), timeout_s=30)
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
    assert new != old
    versions = {r.weights_version for r in replies}
    assert versions == {0, 1}, versions
    for reply in replies:
        tokens = [list(result.completions[0].token_ids) for result in reply.results]
        assert {c.weights_version for res in reply.results for c in res.completions} == {
            reply.weights_version
        }
        assert tokens == (old if reply.weights_version == 0 else new)


@pytest.mark.timeout(120)
def test_two_replicas_versions_and_failover(tiny_lm_path, new_weights) -> None:
    state, _ = new_weights
    prompts = PROMPTS * 4
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    with running_server(tiny_lm_path) as (a, servicer_a), running_server(tiny_lm_path) as (b, _):
        with running_server(tiny_lm_path) as (gone, _):
            dead = gone.address  # stopped at the end of this block: nothing listens there
        with GenerationClient([a.address]) as single:
            alone = single.generate(prompts, sampling)
        with GenerationClient([a.address, b.address], max_prompts_per_call=3) as client:
            before = servicer_a.scheduler.batches_run
            both = client.generate(prompts, sampling)
            assert servicer_a.scheduler.batches_run > before  # replica a took a share
            assert [r.token_ids for r in both] == [r.token_ids for r in alone]
            client.push_weights(state, version=1)
            assert [i.weights_version for i in client.server_info()] == [1, 1]
            assert {r.weights_version for r in client.generate(prompts, sampling)} == {1}
            with pytest.raises(StaleWeightsError, match="serves version 1"):
                client.generate(prompts, sampling, expected_version=2)
        with GenerationClient([dead, a.address]) as client:  # one replica down: retried on a
            assert [r.token_ids for r in client.generate(prompts[:2], GREEDY)] == [
                r.token_ids for r in GenerationClient([a.address]).generate(prompts[:2], GREEDY)
            ]
            client.push_weights(state, version=2)  # a takes it; the dead one is out of service
            with GenerationClient([a.address]) as only_a:
                assert [i.weights_version for i in only_a.server_info()] == [2]
            assert not client.replicas.in_service(0)
        brief = FailurePolicy(retry_budget_s=0.5, initial_backoff_s=0.1, max_backoff_s=0.2)
        client = GenerationClient([dead], policy=brief)  # no replica takes it: an error
        with client, pytest.raises(WeightSyncError, match=f"no replica:\n  {dead}: .*UNAVAIL"):
            client.push_weights(state, version=3)
