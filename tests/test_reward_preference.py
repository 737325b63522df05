"""Preference model behind a real gRPC server: scores equal a direct forward pass of the same
tiny model (one sample at a time), dynamic batching merges concurrent requests within the token
budget, and a model producing NaN gets INTERNAL naming the samples."""

from __future__ import annotations

import shutil
import threading

import grpc
import pytest
import torch
from conftest import wait_for
from reward_test_verifiers import reward_stub, serving
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_servers.preference import PreferenceModel
from rpp_lightning.proto import reward_pb2
from rpp_lightning.tiny import build_tokenizer

MAX_LENGTH = 64


def _samples(n: int, offset: int = 0) -> list[reward_pb2.Sample]:
    # Lengths from a few tokens to past MAX_LENGTH, so truncation and padding both happen.
    return [
        reward_pb2.Sample(
            id=f"s{offset + i}",
            prompt=f"What is {i} + {offset}?",
            response="Let me think. " * (i % 7) + f"It is {i + offset}.",
        )
        for i in range(n)
    ]


def _direct_scores(model_path, samples: list[reward_pb2.Sample]) -> list[float]:
    """The reference: load the model ourselves and run each sample alone (no padding)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    scores = []
    for sample in samples:
        if tokenizer.chat_template:
            messages = [
                {"role": "user", "content": sample.prompt},
                {"role": "assistant", "content": sample.response},
            ]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(sample.prompt + sample.response)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[-MAX_LENGTH:]])).logits  # (1, 1)
        scores.append(logits[0, 0].item())
    return scores


def _serve(model_path, **kwargs):
    kwargs = {"max_length": MAX_LENGTH, "token_budget": 256, "device": "cpu", **kwargs}
    return serving(PreferenceModel(str(model_path), **kwargs))


@pytest.mark.timeout(120)
def test_served_scores_equal_direct_forward(tiny_classifier_path):
    samples = _samples(12)
    with _serve(tiny_classifier_path) as server, grpc.insecure_channel(server.address) as channel:
        stub = reward_stub(channel)
        info = stub.GetInfo(reward_pb2.GetInfoRequest(), timeout=10)
        assert (info.kind, info.requires_reference) == ("preference", False)
        reply = stub.Score(reward_pb2.ScoreRequest(samples=samples), timeout=60)
    assert [s.id for s in reply.scores] == [s.id for s in samples]
    assert max(int(s.info["tokens"]) for s in reply.scores) == MAX_LENGTH  # some truncated
    direct = _direct_scores(tiny_classifier_path, samples)
    assert [s.reward for s in reply.scores] == pytest.approx(direct, abs=1e-5)
    assert len(set(direct)) == len(direct)  # distinct scores: a mix-up between rows would show


@pytest.mark.timeout(120)
def test_without_chat_template_scores_prompt_plus_response(tiny_classifier_path, tmp_path):
    path = tmp_path / "no-template"
    shutil.copytree(tiny_classifier_path, path)
    build_tokenizer(chat_template=False).save_pretrained(path)
    samples = _samples(5, offset=3)
    with _serve(path) as server, grpc.insecure_channel(server.address) as channel:
        reply = reward_stub(channel).Score(reward_pb2.ScoreRequest(samples=samples), timeout=60)
    direct = _direct_scores(path, samples)
    assert [s.reward for s in reply.scores] == pytest.approx(direct, abs=1e-5)


@pytest.mark.timeout(120)
def test_concurrent_requests_are_merged_within_the_token_budget(tiny_classifier_path):
    budget = 256
    model = PreferenceModel(str(tiny_classifier_path), MAX_LENGTH, budget, device="cpu")
    shapes: list[tuple[int, int]] = []
    requests_per_round: list[int] = []
    original_forward, original_plan = model.forward, model._micro_batches

    def recording_forward(batch):
        if not shapes:  # hold the first forward until the other requests queue up behind it
            waiting = lambda: requests_per_round[0] + model._queue.qsize()  # noqa: E731
            assert wait_for(lambda: waiting() == len(requests), timeout_s=20)
        shapes.append((len(batch), max(len(ids) for ids in batch)))
        return original_forward(batch)

    def recording_plan(pending):
        requests_per_round.append(len(pending))
        return original_plan(pending)

    model.forward, model._micro_batches = recording_forward, recording_plan
    requests = [_samples(6, offset=10 * k) for k in range(8)]
    replies: dict[int, list[float]] = {}
    with serving(model) as server, grpc.insecure_channel(server.address) as channel:
        stub = reward_stub(channel)
        barrier = threading.Barrier(len(requests))

        def client(k: int) -> None:
            barrier.wait()
            reply = stub.Score(reward_pb2.ScoreRequest(samples=requests[k]), timeout=60)
            replies[k] = [s.reward for s in reply.scores]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    direct = _direct_scores(tiny_classifier_path, [s for r in requests for s in r])
    assert [x for k in range(len(requests)) for x in replies[k]] == pytest.approx(direct, abs=1e-5)
    assert all(rows * width <= budget for rows, width in shapes)
    # The first round ran alone or with a few; every request that waited joined ONE round.
    assert len(requests_per_round) <= 2 and sum(requests_per_round) == len(requests)


@pytest.mark.timeout(120)
def test_nan_model_is_internal_naming_the_samples(tiny_classifier_path, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_path)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))  # the reward head
    path = tmp_path / "nan-rm"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_classifier_path).save_pretrained(path)
    with _serve(path) as server, grpc.insecure_channel(server.address) as channel:
        stub = reward_stub(channel)
        for _ in range(2):  # twice: the server keeps serving after the error
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(reward_pb2.ScoreRequest(samples=_samples(3)), timeout=60)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "non-finite rewards for samples 's0', 's1', 's2'" in err.value.details()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(120)
def test_cuda_uses_bfloat16(tiny_classifier_path):
    model = PreferenceModel(str(tiny_classifier_path), MAX_LENGTH, 256, device="auto")
    try:
        assert model.device.type == "cuda" and model.dtype == torch.bfloat16
        samples = _samples(4)
        with serving(model) as server, grpc.insecure_channel(server.address) as channel:
            reply = reward_stub(channel).Score(reward_pb2.ScoreRequest(samples=samples), timeout=60)
        direct = _direct_scores(tiny_classifier_path, samples)
        assert [s.reward for s in reply.scores] == pytest.approx(direct, abs=5e-2)  # bf16
    finally:
        model.close()
