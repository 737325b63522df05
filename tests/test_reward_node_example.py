"""The Node.js verifier in examples/node_verifier, built only from protos/rpp/v1/reward.proto,
talks to our Python client: proof that a verifier in another language plugs in."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from conftest import ROOT
from reward_test_verifiers import request

from rpp_lightning.clients.rewards import RewardClient, RewardQuery
from rpp_lightning.config import RewardSource
from rpp_lightning.proto import reward_pb2, reward_pb2_grpc
from rpp_lightning.rpc.channels import ChannelConfig, open_channel

EXAMPLE = ROOT / "examples" / "node_verifier"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="needs node and npm"
)


@pytest.fixture(scope="module")
def node_modules() -> None:
    if (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return
    install = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert install.returncode == 0, install.stdout + install.stderr


@pytest.mark.timeout(300)
def test_node_verifier_scores_and_reports_errors(node_modules, start_server, monkeypatch):
    token = "node-example-token"
    monkeypatch.setenv("RPP_TEST_NODE_TOKEN", token)
    server = start_server(
        ["node", str(EXAMPLE / "server.js"), "--port", "0"], env={"RPP_REWARD_TOKEN": token}
    )
    config = ChannelConfig(addresses=[server.address], token_env="RPP_TEST_NODE_TOKEN")
    with open_channel(config, ["rpp.v1.RewardService"]) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        meta = config.metadata()
        info = stub.GetInfo(reward_pb2.GetInfoRequest(), metadata=meta, timeout=10)
        assert (info.name, info.requires_reference) == ("node-exact-match", True)
        reply = stub.Score(
            request(("a", " 42 ", "42"), ("b", "41", "42")), metadata=meta, timeout=10
        )
        assert [(s.id, s.reward) for s in reply.scores] == [("a", 1.0), ("b", 0.0)]
        assert reply.scores[1].info["error"] == "wrong_answer"
        bad = {
            "empty": (reward_pb2.ScoreRequest(), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
            "no response": (request(("r", "", "1")), grpc.StatusCode.INVALID_ARGUMENT, "r"),
            "no reference": (request(("q", "1", "")), grpc.StatusCode.INVALID_ARGUMENT, "q"),
        }
        for name, (req, code, text) in bad.items():
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(req, metadata=meta, timeout=10)
            assert err.value.code() == code, name
            assert text in err.value.details(), name
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request(("a", "1", "1")), timeout=10)  # no token
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The trainer's own reward client, as in training.
        source = RewardSource(name="node", addresses=[server.address], token_env=config.token_env)
        client = RewardClient([source])
        try:
            batch = client.score([RewardQuery("p", "7", "7"), RewardQuery("p", "8", "7")])
        finally:
            client.close()
        assert (batch.total, batch.correct) == ([1.0, 0.0], [True, False])
    assert server.stop() == 0  # SIGTERM: drains and exits 0
    assert "scored samples=2" in server.text
