"""Property-based fuzzing of every RPC against real servers on loopback (Hypothesis).

The property, for any request message and any raw bytes on any method path: the call ends with
OK or a clean client-error status (never INTERNAL or UNKNOWN) within its deadline, the status
message stays within 1000 bytes, health still answers SERVING, and the next valid call is
answered correctly. Messages are generated field by field, with the strings a policy in training
really emits (runs of spaces, open braces, NUL, huge ids) mixed in.

A few seconds per test by default; set RPP_FUZZ_EXAMPLES (examples per test, default 12) for a
longer campaign, e.g. `RPP_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

import math
import os
import time

import grpc
import pytest
from adversarial_cases import MAX_MESSAGE_BYTES, score_request
from generation_helpers import request, running_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reward_test_verifiers import reward_stub, serving

from reward_servers.math_verifier import MathVerifier
from rpp_lightning.generation.server import GenerationLimits
from rpp_lightning.proto import generation_pb2 as gen_pb
from rpp_lightning.proto import generation_pb2_grpc, reward_pb2

EXAMPLES = int(os.environ.get("RPP_FUZZ_EXAMPLES", "12"))
DEADLINE_S = 20.0
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a call's time is checked by the property itself
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=EXAMPLES <= 12,  # the normal run is the same every time; long runs explore
)
CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
}
REWARD_METHODS = ["/rpp.v1.RewardService/Score", "/rpp.v1.RewardService/GetInfo"]
GENERATION_METHODS = ["/rpp.v1.GenerationService/Generate", "/rpp.v1.GenerationService/GetInfo"]

_ATOMS = [
    "answer is", "The answer: ", "\\boxed{", "\\fbox {", "{", "}", " ", "   ", "\n", ".", ". ",
    "$", "1", "-3", "1,234", "0.5", "/", "\\frac{1}{2}", "(", ")", "^", "!", "=", ":", "\t",
    "\x00", "é", "\U0001d6fc", "\\sqrt{", "10^{8}",
]  # fmt: skip
text = st.one_of(
    st.lists(st.one_of(st.sampled_from(_ATOMS), st.text(max_size=4)), max_size=30).map("".join),
    st.builds(lambda atom, k: atom * k, st.sampled_from(_ATOMS), st.integers(1, 20_000)),
)
ids = st.one_of(st.text(max_size=12), st.builds(lambda k: "i" * k, st.integers(1000, 5000)))


def _call(fn) -> tuple[grpc.StatusCode, str, float]:
    start = time.monotonic()
    try:
        fn()
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    return code, details, time.monotonic() - start


def _assert_clean(code: grpc.StatusCode, details: str, took: float) -> None:
    assert code in CLEAN, (code, details[:300])
    assert len(details.encode()) <= MAX_MESSAGE_BYTES, details[:300]
    assert took < DEADLINE_S


def _assert_serving(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- the math reward server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def math_channel():
    with (
        serving(MathVerifier(workers=2, timeout_s=1.0, hard_grace_s=1.0)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield channel


def _math_still_right(channel: grpc.Channel) -> None:
    _assert_serving(channel)
    [score] = (
        reward_stub(channel).Score(score_request(("ok", "\\boxed{2}", "2")), timeout=10).scores
    )
    assert score.reward == 1.0


samples = st.builds(
    reward_pb2.Sample,
    id=ids,
    prompt=st.text(max_size=10),
    response=text,
    reference=st.one_of(text, st.sampled_from(["1", "2", "\\frac{1}{2}", "x^2"])),
    metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2),
)


@pytest.mark.timeout(300)
@FUZZ
@given(st.lists(samples, max_size=4))
def test_score_requests_get_a_clean_answer(math_channel, drawn):
    scored = []
    code, details, took = _call(
        lambda: scored.extend(
            reward_stub(math_channel)
            .Score(reward_pb2.ScoreRequest(samples=drawn), timeout=DEADLINE_S)
            .scores
        )
    )
    _assert_clean(code, details, took)
    if code == grpc.StatusCode.OK:
        assert [s.id for s in scored] == [s.id for s in drawn]
        assert all(math.isfinite(s.reward) for s in scored)
    _math_still_right(math_channel)


@pytest.mark.timeout(300)
@FUZZ
@given(st.sampled_from(REWARD_METHODS), st.binary(max_size=300))
def test_raw_bytes_on_reward_methods(math_channel, method, payload):
    call = math_channel.unary_unary(method)  # no serializer: the bytes go as they are
    _assert_clean(*_call(lambda: call(payload, timeout=DEADLINE_S)))
    _math_still_right(math_channel)


# --- the generation server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def generation(tiny_lm_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-weights-root")
    limits = GenerationLimits(
        max_new_tokens_limit=24, max_samples_per_request=16, weights_root=str(root)
    )
    with (
        running_server(tiny_lm_path, limits) as (server, servicer),
        grpc.insecure_channel(server.address) as channel,
    ):
        yield channel, servicer


def _generation_still_right(channel: grpc.Channel, servicer) -> None:
    _assert_serving(channel)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    reply = stub.Generate(request([[1, 5, 6]], max_new_tokens=3, seed=0), timeout=10)
    completion = reply.results[0].completions[0]
    assert 1 <= len(completion.token_ids) <= 3
    assert all(t < servicer.info.vocab_size for t in completion.token_ids)
    assert reply.weights_version == servicer.scheduler.version


def _generate_request(prompts, sampling, required, minimum) -> gen_pb.GenerateRequest:
    message = gen_pb.GenerateRequest(prompts=prompts, sampling=sampling)
    if required is not None:
        message.required_weights_version = required
    if minimum is not None:
        message.min_weights_version = minimum
    return message


floats = st.floats(width=32)
generate_requests = st.builds(
    _generate_request,
    prompts=st.lists(
        st.builds(gen_pb.Prompt, id=ids, token_ids=st.lists(st.integers(0, 200), max_size=6)),
        max_size=3,
    ),
    sampling=st.builds(
        gen_pb.SamplingParams,
        n=st.integers(0, 5),
        temperature=st.one_of(floats, st.sampled_from([0.0, 1e-40, 1e-6, 1.0])),
        top_p=floats,
        top_k=st.integers(0, 2**32 - 1),
        max_new_tokens=st.integers(0, 30),
        stop_token_ids=st.lists(st.integers(0, 300), max_size=4),
        seed=st.integers(0, 2**64 - 1),
    ),
    required=st.one_of(st.none(), st.integers(0, 3)),
    minimum=st.one_of(st.none(), st.integers(0, 3)),
)


@pytest.mark.timeout(300)
@FUZZ
@given(generate_requests)
def test_generate_requests_get_a_clean_answer(generation, drawn):
    channel, servicer = generation
    stub = channel.unary_unary(
        "/rpp.v1.GenerationService/Generate",
        request_serializer=gen_pb.GenerateRequest.SerializeToString,
        response_deserializer=gen_pb.GenerateResponse.FromString,
    )
    _assert_clean(*_call(lambda: stub(drawn, timeout=DEADLINE_S)))
    _generation_still_right(channel, servicer)


def _update_messages(servicer):
    names = sorted(servicer.shapes)
    chunk = st.builds(
        gen_pb.TensorChunk,
        name=st.one_of(st.sampled_from(names), st.text(max_size=10)),
        dtype=st.integers(0, 10),
        shape=st.lists(st.integers(0, 64), max_size=3),
        offset=st.integers(0, 300),
        data=st.binary(max_size=256),
    )
    return st.one_of(
        st.builds(
            lambda v, d: gen_pb.UpdateWeightsRequest(
                header=gen_pb.WeightsHeader(target_version=v, safetensors_dir=d)
            ),
            st.integers(0, 2**64 - 1),
            st.one_of(st.just(""), text, st.sampled_from(["/", "..", "/etc", "\x00"])),
        ),
        st.builds(
            lambda c: gen_pb.UpdateWeightsRequest(chunks=gen_pb.TensorChunks(chunks=c)),
            st.lists(chunk, max_size=3),
        ),
        st.builds(
            lambda n, b: gen_pb.UpdateWeightsRequest(
                commit=gen_pb.WeightsCommit(num_tensors=n, num_bytes=b)
            ),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**64 - 1),
        ),
        st.just(gen_pb.UpdateWeightsRequest()),
    )


@pytest.mark.timeout(300)
@FUZZ
@given(data=st.data())
def test_update_weights_streams_get_a_clean_answer(generation, data):
    channel, servicer = generation
    stream = data.draw(st.lists(_update_messages(servicer), max_size=6))
    if data.draw(st.booleans()):  # most streams start as a real one would
        version = servicer.scheduler.version + 1
        stream.insert(
            0, gen_pb.UpdateWeightsRequest(header=gen_pb.WeightsHeader(target_version=version))
        )
    before = servicer.scheduler.version
    call = channel.stream_unary(
        "/rpp.v1.GenerationService/UpdateWeights",
        request_serializer=gen_pb.UpdateWeightsRequest.SerializeToString,
        response_deserializer=gen_pb.UpdateWeightsResponse.FromString,
    )
    code, details, took = _call(lambda: call(iter(stream), timeout=DEADLINE_S))
    _assert_clean(code, details, took)
    if code != grpc.StatusCode.OK:
        assert servicer.scheduler.version == before  # a refused update changes nothing
    _generation_still_right(channel, servicer)


@pytest.mark.timeout(300)
@FUZZ
@given(
    st.sampled_from([*GENERATION_METHODS, "/rpp.v1.GenerationService/UpdateWeights"]),
    st.lists(st.binary(max_size=200), min_size=1, max_size=3),
)
def test_raw_bytes_on_generation_methods(generation, method, payloads):
    channel, servicer = generation
    before = servicer.scheduler.version
    if method.endswith("UpdateWeights"):
        call = channel.stream_unary(method)
        outcome = _call(lambda: call(iter(payloads), timeout=DEADLINE_S))
    else:
        call = channel.unary_unary(method)
        outcome = _call(lambda: call(payloads[0], timeout=DEADLINE_S))
    _assert_clean(*outcome)
    assert servicer.scheduler.version == before
    _generation_still_right(channel, servicer)
