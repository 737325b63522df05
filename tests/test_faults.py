"""Faults of the servers a run depends on, with real server processes and real trainer runs.

Client-level tests talk real gRPC to real servers (math-verify replicas, a transformers
generation server, and reward servers written here that implement the proto badly). Trainer-level
tests run `rpp-train fit` as a process and inject faults by killing and restarting its servers.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, ServerProcess, python_module
from test_trainer import served_version

from rpp_lightning.clients.generation import GenerationClient, SamplingConfig, StaleWeightsError
from rpp_lightning.clients.local_servers import ChildServer
from rpp_lightning.clients.rewards import RewardClient, RewardError, RewardQuery
from rpp_lightning.config import RewardSource
from rpp_lightning.proto import reward_pb2, reward_pb2_grpc
from rpp_lightning.rl.faults import EXIT_SERVER_FAILURE
from rpp_lightning.rpc.failures import FailurePolicy
from rpp_lightning.rpc.server_config import ServerConfig
from rpp_lightning.rpc.serving import GrpcServer, ServiceSpec

SERVICE = "rpp.v1.RewardService"
FAST = FailurePolicy(retry_budget_s=2.0, initial_backoff_s=0.1, max_backoff_s=0.5)
QUERIES = [
    RewardQuery("1+1=", "2", "2"),
    RewardQuery("2+2=", "4", "4"),
    RewardQuery("3+3=", "5", "6"),
]


# ---- a reward server that answers badly -----------------------------------------------------


class BadRewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Implements rpp.v1.RewardService wrongly, in the way `mode` says."""

    def __init__(self, mode: str) -> None:
        self.mode, self.calls = mode, 0

    def GetInfo(self, request, context):
        return reward_pb2.RewardServerInfo(name="bad", kind="verifier")

    def Score(self, request, context):
        self.calls += 1
        ids = [s.id for s in request.samples]
        if self.mode == "hang":
            time.sleep(3)
        if self.mode == "too_few":
            ids = ids[:-1]
        if self.mode == "unknown_ids":
            ids = [f"x{i}" for i in ids]
        reward = float("nan") if self.mode == "nan" else 1.0
        return reward_pb2.ScoreResponse(scores=[reward_pb2.Score(id=i, reward=reward) for i in ids])


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("too_few", r"answered 2 scores .* asked for 3"),
        ("unknown_ids", r"sample ids \[x0, x1, x2\], asked for 3 with ids \[0, 1, 2\]"),
        ("nan", r"non-finite reward \(nan\) for sample 0"),
        ("hang", r"127\.0\.0\.1:\d+ answered within the retry budget .* DEADLINE_EXCEEDED"),
    ],
)
def test_misbehaving_reward_server_gets_a_clear_error(mode, message) -> None:
    servicer = BadRewardServicer(mode)
    server = GrpcServer(
        ServerConfig(port=0),
        [ServiceSpec(servicer, reward_pb2_grpc.add_RewardServiceServicer_to_server, SERVICE)],
    )
    port = server.start()
    source = RewardSource(name="bad", addresses=[f"127.0.0.1:{port}"], timeout_s=0.5)
    client = RewardClient([source], FailurePolicy(retry_budget_s=1.0, initial_backoff_s=0.1))
    try:
        start = time.monotonic()
        with pytest.raises(RewardError, match=message):
            client.score(QUERIES)  # raising is what keeps its answer out of training
        assert time.monotonic() - start < 5  # bounded: never a hang
        # a wrong answer is not retried (it would be wrong again); a hang is, within the budget
        assert servicer.calls == 1 if mode != "hang" else servicer.calls >= 2
    finally:
        client.close()
        server.stop(grace=0)


# ---- replicas that die and come back ----------------------------------------------------------


def math_server(port: int = 0) -> ServerProcess:
    return ServerProcess(
        python_module(
            "reward_servers.cli", "math", "--port", str(port), "--verifier-args", "workers=1"
        )
    )  # fmt: skip


def test_lost_reward_replica_moves_its_chunks_to_the_other(caplog) -> None:
    first, second = math_server(), math_server()
    source = RewardSource(name="math", addresses=[first.address, second.address], timeout_s=10)
    client = RewardClient([source], FAST)
    try:
        assert client.score(QUERIES).total == [1.0, 1.0, 0.0]
        second.proc.kill()  # SIGKILL: no drain, connections reset
        second.proc.wait()
        with caplog.at_level(logging.WARNING, logger="rpp.replicas"):
            for _ in range(4):  # chunks rotate over the replicas: one of them goes to the lost one
                assert client.score(QUERIES).total == [1.0, 1.0, 0.0]
        lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
        assert len(lost) == 1 and second.address in lost[0] and "other" in lost[0], lost
        first.stop()  # now none is left: the call fails past the budget, naming both
        with pytest.raises(RewardError, match="retry budget") as error:
            client.score(QUERIES)
        assert first.address in str(error.value) and second.address in str(error.value)
    finally:
        client.close()
        first.stop()


def test_reward_outage_shorter_than_the_budget_is_waited_out() -> None:
    server = math_server()
    port = int(server.address.rsplit(":", 1)[1])
    policy = FailurePolicy(retry_budget_s=30.0, initial_backoff_s=0.2, max_backoff_s=1.0)
    client = RewardClient([RewardSource(name="math", addresses=[server.address])], policy)
    restarted = None
    try:
        server.stop()
        answers: list = []
        # the call waits in a thread; the server restarts from this one (a child dies with the
        # thread that started it: PR_SET_PDEATHSIG)
        call = threading.Thread(target=lambda: answers.append(client.score(QUERIES).total))
        start = time.monotonic()
        call.start()
        time.sleep(1.0)
        assert call.is_alive()  # still waiting, not failed
        restarted = math_server(port)
        call.join(timeout=30)
        assert answers == [[1.0, 1.0, 0.0]] and time.monotonic() - start > 1.0
    finally:
        client.close()
        if restarted is not None:
            restarted.stop()


def test_restarted_generation_replica_is_refused_until_it_has_the_weights(
    tiny_lm_path, caplog
) -> None:
    from transformers import AutoModelForCausalLM

    def generation_server(port: int = 0, wait: bool = True) -> ChildServer:
        argv = ["--model", str(tiny_lm_path), "--port", str(port)]
        module = python_module("rpp_lightning.generation.cli", *argv)
        return ChildServer(module, name="generation", cwd=str(ROOT), wait=wait)

    stays, restarts = generation_server(wait=False), generation_server(wait=False)
    stays.wait_ready()  # started side by side
    restarts.wait_ready()
    port = int(restarts.address.rsplit(":", 1)[1])
    weights = AutoModelForCausalLM.from_pretrained(tiny_lm_path).state_dict()
    weights = {k: v + 0.01 * torch.randn_like(v) for k, v in weights.items()}
    patient = FailurePolicy(retry_budget_s=20.0, initial_backoff_s=0.1, max_backoff_s=0.5)
    client = GenerationClient([stays.address, restarts.address], policy=patient)
    fresh = None
    try:
        client.wait_until_ready()
        client.push_weights(weights, version=3)
        sampling = SamplingConfig(n=2, max_new_tokens=4, seed=7)
        prompts = [[5, 6, 7], [8, 9], [10, 11], [12]]
        before = client.generate(prompts, sampling)
        restarts.stop()
        fresh = generation_server(port)  # the same address, at version 0
        # reachable again (GetInfo reconnects the client's channel) but at version 0
        assert [info.weights_version for info in client.server_info()] == [3, 0]
        with caplog.at_level(logging.WARNING, logger="rpp.replicas"):
            after = client.generate(prompts, sampling)  # its prompts go to the current replica
        assert {r.weights_version for r in after} == {3}
        assert [r.token_ids for r in after] == [r.token_ids for r in before]  # same seed
        assert any(
            fresh.address in r.getMessage() and "another weights version" in r.getMessage()
            for r in caplog.records
        )
        client.push_weights(weights, version=4)  # reaches the restarted one too: back in service
        assert served_version(fresh.address) == 4 and client.replicas.in_service(1)
        stays.stop()
        only_fresh = GenerationClient([fresh.address], policy=FAST)
        try:
            with pytest.raises(StaleWeightsError):  # no replica serves what the trainer has
                only_fresh.generate(prompts, sampling, expected_version=5)
        finally:
            only_fresh.close()
    finally:
        client.close()
        for child in (stays, restarts, fresh):
            if child is not None:
                child.stop()


# ---- trainer runs that live through faults ----------------------------------------------------


@pytest.fixture(scope="module")
def schedule(tmp_path_factory):
    """benchmarks/fault_survival.py's schedule, run once: one run of 16 iterations through five
    trainer processes and seven faults (see that file). Each test below checks one of them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fault_survival import schedule as run_schedule

    return run_schedule(tmp_path_factory.mktemp("faults"), iterations=16, budget_s=15.0)


def _lines(output: str, *words: str) -> list[str]:
    return [line for line in output.splitlines() if all(w in line for w in words)]


@pytest.mark.slow
def test_the_run_survives_every_fault_and_trains_each_sample_once(schedule) -> None:
    assert schedule["faults_injected"] == 7 and schedule["runs_completed"] == 1
    assert schedule["samples_trained_twice"] == 0 and schedule["samples_skipped"] == 0
    segments = schedule["segments"]
    steps = [step for segment in segments for step in segment["steps"]]
    assert sorted(set(steps)) == list(range(16))  # every iteration ran (some twice: see below)


@pytest.mark.slow
def test_one_of_two_reward_replicas_killed(schedule) -> None:
    lost = _lines(schedule["outputs"][0], "replica", schedule["addresses"]["b"], "lost")
    assert lost and "its calls go to the 1 other(s)" in lost[0], schedule["outputs"][0][-3000:]
    assert schedule["segments"][0]["steps"][:8] == list(range(8))  # none missed after it


@pytest.mark.slow
def test_restarted_generation_server_gets_the_weights_before_it_serves(schedule) -> None:
    output = schedule["outputs"][0]
    assert _lines(output, "no generation replica serves weights version", "pushing"), output[-3000:]
    assert schedule["iterations_from_wrong_weights"] == 0
    versions = [trainer for _, trainer in schedule["segments"][0]["versions"]]
    assert versions == sorted(set(versions))
    # the re-push after the restart is one version more than iterations
    assert versions[-1] - versions[0] == len(versions)


@pytest.mark.slow
def test_reward_outage_shorter_than_the_budget_is_waited_out_by_the_run(schedule) -> None:
    replica = schedule["addresses"]["a"]
    assert _lines(schedule["outputs"][0], f"replica {replica} serves again")
    assert schedule["segments"][0]["steps"][6:8] == [6, 7]  # carried on after it


@pytest.mark.slow
def test_outage_past_the_budget_checkpoints_exits_75_and_resumes(schedule) -> None:
    first, third = schedule["segments"][0], schedule["segments"][2]
    assert first["exit"] == EXIT_SERVER_FAILURE
    (message,) = _lines(schedule["outputs"][0], "rpp-train: ")
    assert schedule["addresses"]["a"] in message and "UNAVAILABLE" in message
    assert "retry budget (15 s)" in message
    assert Path(first["checkpoint"]).name == f"interrupted-iter{first['steps'][-1] + 1}.ckpt"
    assert first["checkpoint_iteration"] == first["steps"][-1] + 1  # the failed one is redone
    assert third["steps"][0] == first["checkpoint_iteration"]  # (the second one failed at once)


@pytest.mark.slow
def test_misbehaving_reward_server_stops_the_run_with_nothing_trained(schedule) -> None:
    before, bad = schedule["segments"][:2]
    assert bad["exit"] == EXIT_SERVER_FAILURE and bad["steps"] == []
    assert _lines(schedule["outputs"][1], "rpp-train: ", "non-finite reward (nan)")
    assert bad["checkpoint_iteration"] == before["checkpoint_iteration"]


@pytest.mark.slow
def test_trainer_sigkill_loses_at_most_the_checkpoint_interval(schedule) -> None:
    killed, resumed = schedule["segments"][2:4]  # checkpoints every 2 iterations
    assert killed["exit"] == -signal.SIGKILL
    assert 0 <= killed["steps"][-1] + 1 - killed["checkpoint_iteration"] <= 2
    assert resumed["steps"][0] == killed["checkpoint_iteration"]


@pytest.mark.slow
def test_trainer_sigkill_during_a_checkpoint_save_leaves_last_ckpt_loadable(schedule) -> None:
    killed, resumed = schedule["segments"][3:5]
    assert schedule["killed_during_save"], "the kill missed the save: nothing was tested"
    assert killed["exit"] == -signal.SIGKILL
    # last.ckpt loaded (torch.load in the schedule) and the run went on from it
    assert resumed["steps"][0] == killed["checkpoint_iteration"] and resumed["exit"] == 0


def test_failure_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="retry_budget_s must be >= 0"):
        FailurePolicy(retry_budget_s=-1).validate()
    with pytest.raises(ValueError, match="initial_backoff_s"):
        FailurePolicy(initial_backoff_s=5, max_backoff_s=1).validate()
    waits = [FailurePolicy(initial_backoff_s=1, max_backoff_s=4).backoff_s(k) for k in range(6)]
    assert all(0 <= w <= min(4, 2**k) for k, w in enumerate(waits))


# ---- bad trainer input ------------------------------------------------------------------------


BAD_INPUTS = {
    "missing prompt": (
        [{"prompt": "1+1=", "answer": "2"}, {"question": "2+2=", "answer": "4"}],
        [],
        r"train\.jsonl: 1 rows have no column 'prompt' \(first: row 1",
    ),
    "missing answer": (
        [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}],
        [],
        r"train\.jsonl: 1 rows have no column 'answer' \(first: row 1",
    ),
    "empty prompt": (
        [{"prompt": "1+1=", "answer": "2"}, {"prompt": "  ", "answer": "4"}],
        [],
        r"train\.jsonl: 1 rows have an empty 'prompt' \(first: row 1\)",
    ),
    "unknown route": (
        [{"prompt": "1+1=", "answer": "2", "task": "math"},
         {"prompt": "hi", "answer": "", "task": "chat"}],
        ["--model.rewards",
         "[{name: math, local: math, route_column: task, route_values: [math]}]"],
        r"train\.jsonl: 1 rows match no reward source \(first: row 1, columns \{'task': 'chat'\}",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_trainer_input_fails_before_any_server_starts(case, tmp_path, monkeypatch) -> None:
    import json

    import rpp_lightning.rl.trainer_servers
    from rpp_lightning.cli import cli_main

    rows, overrides, message = BAD_INPUTS[case]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    started = []
    real = rpp_lightning.rl.trainer_servers.ChildServer
    monkeypatch.setattr(
        rpp_lightning.rl.trainer_servers,
        "ChildServer",
        lambda *a, **k: started.append(a) or real(*a, **k),
    )
    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--model.policy.tokenizer", str(ROOT / "assets" / "char_tokenizer"),
        "--data.train_path", str(train), "--data.val_path", "null",
        "--trainer.enable_progress_bar", "false", *overrides,
    ]  # fmt: skip
    with pytest.raises(ValueError, match=message):
        cli_main(args)
    assert started == []


def test_unknown_yaml_key_is_named(tmp_path, capsys) -> None:
    from rpp_lightning.cli import cli_main

    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text() + "  kl_coeff: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--config", str(config)], run=False)
    assert exit_info.value.code != 0
    assert "kl_coeff" in capsys.readouterr().err
