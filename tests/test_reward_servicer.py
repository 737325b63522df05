"""RewardServicer logic without a server: validation messages, reward checks, GetInfo."""

from __future__ import annotations

import math

import grpc
import pytest
from reward_test_verifiers import ExactMatch, SleepyLength, request

from reward_servers.base import SampleInput, ScoreResult, Verifier
from reward_servers.cli import parse_verifier_args
from reward_servers.servicer import RequestLimits, RewardServicer
from rpp_lightning.rpc.serving import StatusError


class FixedRewards(Verifier):
    """Returns the given rewards whatever the samples (to test the servicer's checks)."""

    name = "fixed"

    def __init__(self, rewards: list[float]) -> None:
        self.rewards = rewards

    def score(self, samples: list[SampleInput], deadline_s: float | None) -> list[ScoreResult]:
        return [ScoreResult(r) for r in self.rewards]


def _error(servicer: RewardServicer, req) -> StatusError:
    with pytest.raises(StatusError) as err:
        servicer.score_request(req)
    return err.value


def test_valid_request_round_trips_ids_order_and_info():
    reply = RewardServicer(SleepyLength(scale=0.5)).score_request(
        request(("z", "abcd", ""), ("", "ab", ""), ("a", "a", ""))
    )
    assert [(s.id, s.reward) for s in reply.scores] == [("z", 2.0), ("", 1.0), ("a", 0.5)]
    assert reply.scores[0].info["slept_s"] == "0.0"


def test_every_problem_is_reported_with_sample_ids():
    servicer = RewardServicer(ExactMatch(), RequestLimits(max_samples=10, max_chars=5))
    err = _error(
        servicer, request(("a", "", "1"), ("", "x", ""), ("c", "123456", "1"), ("a", "1", "1"))
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty response in samples 'a'" in err.message
    assert "exact-match requires a reference; missing in samples '#1'" in err.message
    assert "longer than 5 characters in samples 'c'" in err.message
    assert "duplicate sample ids 'a'" in err.message


def test_long_id_lists_are_shortened():
    samples = [(f"s{i}", "", "") for i in range(25)]
    err = _error(RewardServicer(SleepyLength()), request(*samples))
    assert "'s4' ... and 20 more" in err.message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_are_internal_naming_ids(bad):
    servicer = RewardServicer(FixedRewards([1.0, bad, 0.0]))
    err = _error(servicer, request(("a", "x", ""), ("b", "x", ""), ("c", "x", "")))
    assert err.code == grpc.StatusCode.INTERNAL
    assert "non-finite rewards for samples 'b'" in err.message


def test_wrong_number_of_scores_is_internal():
    err = _error(RewardServicer(FixedRewards([1.0])), request(("a", "x", ""), ("b", "x", "")))
    assert err.code == grpc.StatusCode.INTERNAL
    assert "returned 1 scores for 2 samples" in err.message


def test_deadline_passed_during_scoring_is_deadline_exceeded():
    with pytest.raises(StatusError) as err:
        RewardServicer(SleepyLength(sleep_s=0.2)).score_request(request(("a", "x", "")), 0.05)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_info_comes_from_the_verifier_and_limits():
    info = RewardServicer(ExactMatch(), RequestLimits(max_samples=7)).info()
    assert (info.name, info.kind, info.version) == ("exact-match", "verifier", "1")
    assert info.requires_reference and info.max_samples_per_request == 7


def test_verifier_args_json_or_key_value():
    assert parse_verifier_args(['{"a": 1, "b": [1, 2]}']) == {"a": 1, "b": [1, 2]}
    assert parse_verifier_args(["a=1", "b=cpu", "c=[1]", "d=0.5"]) == {
        "a": 1,
        "b": "cpu",
        "c": [1],
        "d": 0.5,
    }
