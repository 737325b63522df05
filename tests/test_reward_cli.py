"""`rpp-reward-server` as a process: start-up errors, user verifiers with arguments, bearer
token kept out of the logs, SIGTERM drain, the math server without torch, the preference kind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from conftest import ROOT, python_module, wait_for
from process_tree import Tree
from reward_test_verifiers import request, reward_stub

from rpp_lightning.proto import reward_pb2

TESTS = str(ROOT / "tests")
# Lets `--verifier reward_test_verifiers:...` import the test verifiers, like a user's package.
ENV = {"PYTHONPATH": os.pathsep.join([TESTS, str(ROOT), os.environ.get("PYTHONPATH", "")])}
CLI = "reward_servers.cli"


@pytest.mark.timeout(90)
def test_bad_start_up_arguments_exit_2_with_a_clear_message(tmp_path):
    cases = {
        ("--verifier", "no_such_pkg.scorer:Scorer"): "cannot import verifier module 'no_such_pkg",
        ("--verifier", "reward_test_verifiers:Missing"): "has no attribute 'Missing'",
        ("--verifier", "reward_test_verifiers:NotAVerifier"): "not a subclass",
        ("--verifier", "reward_test_verifiers"): "must look like my_pkg.my_module:MyVerifier",
        ("--verifier", "reward_test_verifiers:SleepyLength", "--verifier-args", "speed=3"): (
            "unexpected keyword argument 'speed'"
        ),
        ("--verifier", "reward_test_verifiers:SleepyLength", "--verifier-args", "{bad"): (
            "not valid JSON"
        ),
        (): "give exactly one of",
        ("preference",): "preference needs --model",
        ("preference", "--model", str(tmp_path / "missing")): "cannot build PreferenceModel",
        ("math", "--token-env", "RPP_UNSET_TOKEN_VARIABLE"): "is unset or empty",
    }
    env = {**os.environ, **ENV}
    procs = {
        args: subprocess.Popen(
            python_module(CLI, *args, "--port", "0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for args in cases
    }
    for args, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=80)
        assert proc.returncode == 2, (args, stderr)
        assert cases[args] in stderr, (args, stderr)
        assert "listening on" not in stdout


@pytest.mark.timeout(60)
def test_user_verifier_with_args_token_and_log_lines(start_server):
    token = "tok-user-verifier-5678"
    server = start_server(
        python_module(
            CLI,
            "--verifier",
            "reward_test_verifiers:SleepyLength",
            "--verifier-args",
            "scale=2",
            "sleep_s=0",
            "--port",
            "0",
            "--token-env",
            "RPP_TEST_TOKEN",
        ),
        env={**ENV, "RPP_TEST_TOKEN": token},
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = reward_stub(channel)
        reply = stub.Score(
            request(("a", "abc", ""), ("b", "de", "")),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
        assert [s.reward for s in reply.scores] == [6.0, 4.0]
        for metadata in [(("authorization", "Bearer nope"),), ()]:
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(request(("a", "abc", "")), metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.stop() == 0
    assert "scored samples=2 latency_ms=" in server.text  # one line per batch
    assert "denied: missing or invalid bearer token" in server.text
    assert token not in server.text


def start_sleepy_server(start_server, sleep_s: float):
    """A reward server whose verifier sleeps `sleep_s` per batch (a slow scorer of known speed)."""
    argv = ["--verifier", "reward_test_verifiers:SleepyLength", "--verifier-args"]
    return start_server(python_module(CLI, *argv, f"sleep_s={sleep_s}", "--port", "0"), env=ENV)


@pytest.mark.timeout(60)
def test_sigterm_finishes_in_flight_and_refuses_new_calls(start_server):
    server = start_sleepy_server(start_server, sleep_s=2.0)
    with grpc.insecure_channel(server.address) as channel:
        stub = reward_stub(channel)
        stub.GetInfo(reward_pb2.GetInfoRequest(), timeout=10)  # connected
        in_flight = stub.Score.future(request(("slow", "abcd", "")), timeout=30)
        time.sleep(0.5)  # let the call reach the servicer (it then sleeps 2s)
        server.signal(signal.SIGTERM)
        assert wait_for(lambda: "draining" in server.text, 10), server.text
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request(("new", "x", "")), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert in_flight.result().scores[0].reward == 4.0  # finished despite the SIGTERM
    assert server.proc.wait(30) == 0


@pytest.mark.timeout(60)
def test_sigterm_after_the_client_left_stops_the_abandoned_work(start_server):
    """A trainer killed mid-Score leaves work nobody will read: SIGTERM must not wait for it."""
    server = start_server(
        python_module(CLI, "math", "--port", "0", "--verifier-args", "workers=1"), env=ENV
    )
    tree = Tree(server.proc.pid)
    tree.poll()  # the fork server and the worker
    slow = [(f"s{i}", r"\boxed{(10^{8})!}", "1") for i in range(4)]  # each runs 5 s, to timeout
    with grpc.insecure_channel(server.address) as channel:
        call = reward_stub(channel).Score.future(request(*slow), timeout=60)
        time.sleep(1.0)
        call.cancel()  # the client goes away, as a killed trainer's calls do
    start = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.text
    assert time.monotonic() - start < 5, server.text  # not the 20 s the queued samples need
    assert "Traceback" not in server.text, server.text
    assert len(tree.seen) >= 2 and wait_for(lambda: not tree.survivors(), 5), tree.survivors()


@pytest.mark.timeout(90)
def test_a_client_that_goes_away_frees_the_workers_for_the_next(start_server):
    """A killed trainer's batch is dropped, not verified to its end ahead of the next caller."""
    server = start_server(
        python_module(CLI, "math", "--port", "0", "--verifier-args", "workers=1", "timeout_s=6"),
        env=ENV,
    )
    slow = [(f"s{i}", r"\boxed{(10^{8})!}", "1") for i in range(8)]  # each runs 6 s, to timeout
    with grpc.insecure_channel(server.address) as channel:
        stub = reward_stub(channel)
        stub.GetInfo(reward_pb2.GetInfoRequest(), timeout=10)  # connected
        call = stub.Score.future(request(*slow), timeout=60)
        time.sleep(0.5)
        call.cancel()
        start = time.monotonic()
        reply = stub.Score(request(("next", r"\boxed{2}", "2")), timeout=30)
        waited = time.monotonic() - start
    assert reply.scores[0].info["correct"] == "true"
    # the running sample's worker is killed and replaced, the 7 queued ones dropped: not the
    # 5.5 s left of the running one, nor the 42 s of the queued ones
    assert waited < 4.0, (waited, server.text)
    assert wait_for(lambda: "status=CANCELLED" in server.text, 5), server.text


@pytest.mark.timeout(60)
def test_a_handler_deaf_to_shutdown_cannot_keep_the_server_alive(start_server):
    server = start_sleepy_server(start_server, sleep_s=120)
    with grpc.insecure_channel(server.address) as channel:
        call = reward_stub(channel).Score.future(request(("slow", "abcd", "")), timeout=60)
        time.sleep(0.5)
        call.cancel()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 1, server.text
    assert "handlers still running 10s after the drain; exiting anyway" in server.text


_NO_TORCH = '''
import atexit, os, sys

class BlockTorch:
    """Makes `import torch` fail, as on a machine without it."""
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("torch is not installed (blocked by the test)")
        return None

sys.meta_path.insert(0, BlockTorch())

@atexit.register
def report():
    with open(os.environ["RPP_TORCH_REPORT"], "a") as f:
        f.write(f"{os.getpid()} torch_loaded={'torch' in sys.modules}\\n")
'''


@pytest.mark.timeout(60)
def test_math_server_serves_without_torch(start_server, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(_NO_TORCH))
    report = tmp_path / "report.txt"
    env = {
        "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]]),
        "RPP_TORCH_REPORT": str(report),
    }
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env={**os.environ, **env}, capture_output=True
    )
    assert probe.returncode != 0  # the blocker works
    server = start_server(
        python_module(CLI, "math", "--port", "0", "--verifier-args", "workers=1"), env=env
    )
    with grpc.insecure_channel(server.address) as channel:
        reply = reward_stub(channel).Score(
            request(("a", r"\boxed{\frac{2}{4}}", "0.5")), timeout=30
        )
    assert reply.scores[0].reward == 1.0
    assert server.stop() == 0
    pid = server.proc.pid
    lines = report.read_text().splitlines()
    assert f"{pid} torch_loaded=False" in lines, lines
    assert not [line for line in lines if "torch_loaded=True" in line]


@pytest.mark.timeout(90)
def test_preference_kind_serves_a_model(start_server, tiny_classifier_path: Path):
    server = start_server(
        python_module(
            CLI,
            "preference",
            "--model",
            str(tiny_classifier_path),
            "--port",
            "0",
            "--verifier-args",
            "device=cpu",
            "max_length=64",
        )
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = reward_stub(channel)
        info = stub.GetInfo(reward_pb2.GetInfoRequest(), timeout=10)
        assert (info.name, info.kind) == (str(tiny_classifier_path), "preference")
        reply = stub.Score(request(("a", "a fine answer", "")), timeout=30)
    assert reply.scores[0].info["tokens"] != ""
    assert server.stop() == 0
