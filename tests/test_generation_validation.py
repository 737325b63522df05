"""Bad Generate requests get INVALID_ARGUMENT / FAILED_PRECONDITION with a clear message, and
the server keeps serving. Real server on loopback, raw stub (the client would refuse some)."""

from __future__ import annotations

import grpc
import pytest
from generation_helpers import request, running_server, stub_for

from rpp_lightning.generation.server import GenerationLimits
from rpp_lightning.proto import generation_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def address(tiny_lm_path):
    limits = GenerationLimits(max_new_tokens_limit=32, max_samples_per_request=16)
    with running_server(tiny_lm_path, limits) as (server, _):
        yield server.address


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (pb.GenerateRequest(sampling=pb.SamplingParams(n=1, max_new_tokens=4)), "no prompts"),
        (request([[]]), "prompt 0 (id '0') is empty"),
        (request([[1, 2], [1, 104]]), "token id 104 is outside the vocabulary (size 104)"),
        (request([[1]], max_new_tokens=0), "max_new_tokens must be in 1..32, got 0"),
        (request([[1]], max_new_tokens=33), "max_new_tokens must be in 1..32, got 33"),
        (request([[1]], n=0), "sampling.n must be at least 1"),
        (request([[1]], n=17), "exceeds this server's 16 samples per request"),
        (request([[1]], temperature=-0.5), "temperature must be >= 0"),
        (request([[1]], temperature=float("nan")), "temperature must be >= 0"),
        (request([[1]], top_p=1.5), "top_p must be in (0, 1]"),
        (request([[1]], top_p=-0.1), "top_p must be in (0, 1]"),
        (request([[1]], stop_token_ids=[500]), "stop_token_ids [500] are outside"),
        (request([[1] * 500], max_new_tokens=32), "exceed the model's context 512"),
    ],
)
def test_bad_generate_requests_get_invalid_argument(address, bad, message) -> None:
    with stub_for(address) as stub:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(bad, timeout=30)
        assert caught.value.code() == INVALID, caught.value.details()
        assert message in caught.value.details()
        # ...and the server keeps serving.
        ok = stub.Generate(request([[1, 7]], temperature=0, max_new_tokens=2), timeout=30)
        assert len(ok.results[0].completions[0].token_ids) == 2


@pytest.mark.timeout(60)
def test_required_version_mismatch_is_failed_precondition(address) -> None:
    bad = request([[1, 7]], max_new_tokens=2)
    bad.required_weights_version = 3
    good = request([[1, 7]], max_new_tokens=2)
    good.required_weights_version = 0
    with stub_for(address) as stub:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(bad, timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "required_weights_version 3" in caught.value.details()
        assert "serves version 0" in caught.value.details()
        assert stub.Generate(good, timeout=30).weights_version == 0


@pytest.mark.timeout(60)
def test_min_version_refuses_only_older_weights(address) -> None:
    """An asynchronous trainer asks with min_weights_version: the version served or a newer one
    is accepted (a push may land before the request runs), an older one is refused."""
    from rpp_lightning.generation.scheduler import version_refusal

    ahead = request([[1, 7]], max_new_tokens=2)
    ahead.min_weights_version = 1
    both = request([[1, 7]], max_new_tokens=2)
    both.min_weights_version, both.required_weights_version = 0, 0
    at_least_served = request([[1, 7]], max_new_tokens=2)
    at_least_served.min_weights_version = 0
    with stub_for(address) as stub:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(ahead, timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "min_weights_version 1 but this server serves version 0" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(both, timeout=30)
        assert caught.value.code() == INVALID
        assert "at most one of required_weights_version and min_weights_version" in str(
            caught.value.details()
        )
        assert stub.Generate(at_least_served, timeout=30).weights_version == 0
    # the check the scheduler repeats when the rows run, after any swap that jumped the queue
    assert version_refusal(None, 1, 2) is None and version_refusal(2, None, 2) is None
    assert version_refusal(1, None, 2) is not None and version_refusal(None, 3, 2) is not None


@pytest.mark.timeout(60)
def test_get_info_describes_the_server(address, tiny_lm_path) -> None:
    with stub_for(address) as stub:
        info = stub.GetInfo(pb.GenerationInfoRequest(), timeout=30)
    assert info.model == str(tiny_lm_path)
    assert info.backend == "transformers"
    assert (info.vocab_size, info.max_model_len, info.max_new_tokens_limit) == (104, 512, 32)
    assert list(info.eos_token_ids) == [2]
    assert info.weights_version == 0


@pytest.mark.timeout(60)
def test_prompt_at_the_context_limit_is_accepted(address) -> None:
    with stub_for(address) as stub:
        reply = stub.Generate(request([[1] * 480], temperature=0, max_new_tokens=32), timeout=60)
    assert len(reply.results[0].completions[0].token_ids) >= 1
