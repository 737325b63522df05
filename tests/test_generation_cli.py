"""`rpp-generation-server` as a real child process: help, bad model path, health, token auth,
generation and weight push through the client, SIGTERM drain."""

from __future__ import annotations

import signal
import subprocess

import grpc
import pytest
import torch
from conftest import python_module
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from rpp_lightning.clients.generation import GenerationClient, SamplingConfig
from rpp_lightning.rpc.channels import ChannelConfig

MODULE = "rpp_lightning.generation.cli"


@pytest.mark.timeout(60)
def test_help_and_bad_model_path(tmp_path) -> None:
    helped = subprocess.run(python_module(MODULE, "--help"), capture_output=True, text=True)
    assert helped.returncode == 0
    for flag in ("--backend", "--model", "--weights-root", "--max-new-tokens-limit", "--tls-cert"):
        assert flag in helped.stdout
    missing = subprocess.run(
        python_module(MODULE, "--model", str(tmp_path / "nope")), capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert "no config.json there" in missing.stderr


@pytest.mark.timeout(120)
def test_cli_serves_generates_syncs_and_drains(
    start_server, tiny_lm_path, tmp_path, monkeypatch
) -> None:
    root = tmp_path / "weights"
    (root / "v1").mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    state = {k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file(state, str(root / "v1" / "model.safetensors"))
    server = start_server(
        python_module(
            MODULE,
            "--model",
            str(tiny_lm_path),
            "--device",
            "cpu",
            "--port",
            "0",
            "--weights-root",
            str(root),
            "--token-env",
            "RPP_TEST_TOKEN",
            "--max-new-tokens-limit",
            "16",
        ),
        env={"RPP_TEST_TOKEN": "s3cret"},
    )
    with grpc.insecure_channel(server.address) as channel:  # health is open without the token
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="rpp.v1.GenerationService"), timeout=10
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    greedy = SamplingConfig(temperature=0, max_new_tokens=8, seed=0)
    with GenerationClient([server.address]) as anonymous:
        with pytest.raises(grpc.RpcError) as caught:
            anonymous.generate([[1, 20, 21]], greedy)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    monkeypatch.setenv("RPP_TEST_TOKEN", "s3cret")
    config = ChannelConfig(token_env="RPP_TEST_TOKEN")
    with GenerationClient([server.address], channel=config) as client:
        client.wait_until_ready(timeout_s=30)
        assert client.version == 0
        before = client.generate([[1, 20, 21]], greedy)
        client.push_weights_from_dir(str(root / "v1"), version=1)
        after = client.generate([[1, 20, 21]], greedy)
    assert before[0].weights_version == 0 and after[0].weights_version == 1
    assert before[0].token_ids != after[0].token_ids

    server.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert "draining" in server.text and "stopped" in server.text
    assert "now serving weights version 1" in server.text
