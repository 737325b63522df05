"""Weight transports (issue 25): shm, collective (gloo), cuda_ipc and auto against the gRPC stream.

Real gRPC servers on loopback (in this process, or a child process where a test needs another
host identity or a sender that is killed); what is checked is what the servers serve: their
state dicts bit for bit and the log-probs of a fixed greedy batch.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import ROOT
from generation_helpers import running_server

from rpp_lightning.clients.generation import GenerationClient, SamplingConfig, WeightSyncError
from rpp_lightning.generation.server import GenerationLimits
from rpp_lightning.generation.transformers_backend import TransformersBackend
from rpp_lightning.rpc.server_config import ServerConfig

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
GREEDY = SamplingConfig(n=1, temperature=0.0, max_new_tokens=6, seed=0)
LIMITS = dict(update_idle_timeout_s=5.0)


@pytest.fixture(scope="module")
def tied_lm_path(tmp_path_factory):
    """A tiny Llama whose lm_head is its embedding (one Parameter, two state-dict names)."""
    from transformers import LlamaForCausalLM

    from rpp_lightning.tiny import build_tokenizer, tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    model.tie_weights()
    path = tmp_path_factory.mktemp("tied-lm")
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def perturbed(path, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """The model's weights plus noise, in `dtype`: what a trainer step pushes (tied weights
    stay tied: one tensor under both names)."""
    state = TransformersBackend(str(path), device="cpu").model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    new: dict[int, torch.Tensor] = {}
    for v in state.values():
        if v.data_ptr() not in new:
            new[v.data_ptr()] = (v + torch.randn(v.shape, generator=generator)).to(dtype)
    return {k: new[v.data_ptr()] for k, v in state.items()}


def served(client: GenerationClient, servicer) -> tuple[dict, list]:
    state = {k: v.clone() for k, v in servicer.backend.model.state_dict().items()}
    return state, [r.logprobs for r in client.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", ["untied", "tied"])
def test_every_transport_serves_what_the_grpc_stream_serves(
    tiny_lm_path, tied_lm_path, dtype, model
) -> None:
    path = tied_lm_path if model == "tied" else tiny_lm_path
    results = {}
    for transport in ("grpc", "shm", "collective"):
        backend = TransformersBackend(str(path), device="cpu", dtype=str(dtype).split(".")[1])
        with (
            running_server(path, GenerationLimits(**LIMITS), backend=backend) as (server, svc),
            GenerationClient([server.address], weight_transport=transport) as client,
        ):
            client.wait_until_ready()
            for version in (1, 2, 3):  # shm: both regions written, one adopted, then reused
                client.push_weights(perturbed(path, dtype, version), version, dtype=dtype)
            assert client.transport_of(server.address) == transport
            results[transport] = served(client, svc)
            assert client.server_info()[0].weights_version == 3
    want_state, want_logprobs = results["grpc"]
    assert all(torch.equal(want_state[k], perturbed(path, dtype, 3)[k]) for k in want_state)
    for transport in ("shm", "collective"):
        state, logprobs = results[transport]
        assert state.keys() == want_state.keys()
        assert all(torch.equal(state[k], want_state[k]) for k in state), transport
        assert logprobs == want_logprobs, transport


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("transport", ["shm", "collective"])
def test_a_restarted_server_gets_the_next_push_by_the_same_transport(tiny_lm_path, transport):
    port = _free_port()
    config = ServerConfig(host="127.0.0.1", port=port)
    with GenerationClient([f"127.0.0.1:{port}"], weight_transport=transport) as client:
        with running_server(tiny_lm_path, GenerationLimits(**LIMITS), config) as (_, _svc):
            client.wait_until_ready()
            client.push_weights(perturbed(tiny_lm_path, torch.float32, 1), 1)
        # a fresh process at the same address: new files, a new group; version 0 again
        with running_server(tiny_lm_path, GenerationLimits(**LIMITS), config) as (_, svc):
            client.wait_until_ready()
            client.push_weights(perturbed(tiny_lm_path, torch.float32, 3), 3)
            assert client.transport_of(f"127.0.0.1:{port}") == transport
            want = perturbed(tiny_lm_path, torch.float32, 3)
            state = svc.backend.model.state_dict()
            assert all(torch.equal(state[k], want[k]) for k in want)
            assert svc.scheduler.version == 3


def test_a_refused_rendezvous_falls_back_to_grpc_with_one_line(tiny_lm_path, caplog) -> None:
    # The server announces a store no one can reach (TEST-NET-1): the rendezvous times out.
    limits = GenerationLimits(update_idle_timeout_s=2.0, collective_host="192.0.2.1")
    with (
        running_server(tiny_lm_path, limits) as (server, svc),
        GenerationClient([server.address], weight_transport="collective") as client,
    ):
        client.wait_until_ready()
        with caplog.at_level(logging.WARNING, logger="rpp"):
            client.push_weights(perturbed(tiny_lm_path, torch.float32, 1), 1)
            client.push_weights(perturbed(tiny_lm_path, torch.float32, 2), 2)
        assert client.transport_of(server.address) == "grpc"
        lines = [
            r.getMessage() for r in caplog.records if "transport unavailable" in r.getMessage()
        ]
        assert len(lines) == 1 and "rendezvous" in lines[0], lines
        assert svc.scheduler.version == 2


def test_cuda_ipc_on_cpu_falls_back_to_shm_with_one_line(tiny_lm_path, caplog) -> None:
    with (
        running_server(tiny_lm_path, GenerationLimits(**LIMITS)) as (server, _svc),
        GenerationClient([server.address], weight_transport="cuda_ipc") as client,
    ):
        client.wait_until_ready()
        with caplog.at_level(logging.WARNING, logger="rpp"):
            client.push_weights(perturbed(tiny_lm_path, torch.float32, 1), 1)
        assert client.transport_of(server.address) == "shm"
        lines = [
            r.getMessage() for r in caplog.records if "cuda_ipc is not possible" in r.getMessage()
        ]
        assert len(lines) == 1, lines


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda_ipc needs CUDA on both sides")
def test_cuda_ipc_serves_what_grpc_serves(tiny_lm_path) -> None:
    results = {}
    for transport in ("grpc", "cuda_ipc"):
        backend = TransformersBackend(str(tiny_lm_path), device="cuda", dtype="float32")
        with (
            running_server(tiny_lm_path, GenerationLimits(**LIMITS), backend=backend) as (s, svc),
            GenerationClient([s.address], weight_transport=transport) as client,
        ):
            client.wait_until_ready()
            state = {k: v.cuda() for k, v in perturbed(tiny_lm_path, torch.float32, 1).items()}
            client.push_weights(state, 1)
            assert client.transport_of(s.address) == transport
            results[transport] = served(client, svc)
    assert all(torch.equal(results["cuda_ipc"][0][k], v) for k, v in results["grpc"][0].items())


def _child_server(path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpp_lightning.generation.cli", "--model", str(path),
         "--device", "cpu", "--port", "0", "--update-idle-timeout-s", "5"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **env},
    )  # fmt: skip
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.split("listening on")[1].split()[0]
    raise RuntimeError("the generation server did not start")


def test_auto_picks_shm_here_and_grpc_for_a_server_on_another_host(tiny_lm_path) -> None:
    remote, remote_address = _child_server(tiny_lm_path, {"RPP_HOST_ID": "another-host"})
    try:
        with (
            running_server(tiny_lm_path, GenerationLimits(**LIMITS)) as (local, _),
            GenerationClient([local.address, remote_address]) as client,
        ):
            client.wait_until_ready()
            client.push_weights(perturbed(tiny_lm_path, torch.float32, 1), 1)
            assert client.transport_of(local.address) == "shm"
            assert client.transport_of(remote_address) == "grpc"
            assert {i.weights_version for i in client.server_info()} == {1}
    finally:
        remote.terminate()
        remote.wait(30)


SENDER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from rpp_lightning.clients.generation import GenerationClient
    from rpp_lightning.weight_transport.sender import TensorStream
    address, transport, path = sys.argv[1:4]
    state = torch.load(path)
    def dying():
        for i, item in enumerate(state.items()):
            if i == len(state) // 2:
                os.kill(os.getpid(), signal.SIGKILL)  # killed mid-push
            yield item
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    client = GenerationClient([address], weight_transport=transport)
    client.push_weights(TensorStream(specs, dying()), version=5)
    """
)


@pytest.mark.parametrize("transport", ["shm", "collective"])
def test_a_sender_killed_mid_push_leaves_the_old_weights_serving(
    tiny_lm_path, tmp_path, transport
) -> None:
    with (
        running_server(tiny_lm_path, GenerationLimits(update_idle_timeout_s=3.0)) as (s, svc),
        GenerationClient([s.address], weight_transport=transport) as client,
    ):
        client.wait_until_ready()
        client.push_weights(perturbed(tiny_lm_path, torch.float32, 1), 1)
        before = served(client, svc)
        torch.save(perturbed(tiny_lm_path, torch.float32, 9), tmp_path / "state.pt")
        sender = subprocess.run(
            [sys.executable, "-c", SENDER, s.address, transport, str(tmp_path / "state.pt")],
            cwd=ROOT, timeout=120, capture_output=True,
        )  # fmt: skip
        assert sender.returncode == -signal.SIGKILL, sender.stderr[-2000:]
        assert served(client, svc)[1] == before[1] and svc.scheduler.version == 1
        # the trainer pushes again; it lands once the server has given up the dead sender's
        # lease (its idle limit, 3 s here) -- in a run, the next iteration's push
        deadline = time.monotonic() + 20
        while True:
            try:
                client.push_weights(perturbed(tiny_lm_path, torch.float32, 2), 2)
                break
            except WeightSyncError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert svc.scheduler.version == 2
