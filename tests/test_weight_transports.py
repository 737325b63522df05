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
from rpp_lightning.weight_transport.sender import TensorStream

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


# --- a 2-rank FSDP2 trainer pushes through WeightSync -------------------------------------------

FSDP_TRANSPORTS = ("grpc", "shm", "collective")


class _GlooRanks:
    """`Ranks` over the test's default gloo group (what Lightning's strategy gives the trainer)."""

    root_device = torch.device("cpu")

    @property
    def global_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    def broadcast(self, obj, src: int = 0):
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def _fsdp_push_worker(rank: int, model_dir: str, addresses: dict, out: str) -> None:
    """Both ranks: the policy sharded with FSDP2 as the trainer shards it, pushed by WeightSync
    (every rank gathers, rank 0 sends) to one server per transport; then a step changes every
    shard and it is pushed again (shm: the other region; collective: the same group)."""
    import json

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from rpp_lightning.config import GenerationEndpoint, PolicyConfig, RewardSource
    from rpp_lightning.rl.policy import load_sharded_causal_lm
    from rpp_lightning.rl.trainer_servers import TrainerServers
    from rpp_lightning.rl.weight_sync import WeightSync

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    model = load_sharded_causal_lm(PolicyConfig(path=model_dir), mesh, torch.device("cpu"))
    assert isinstance(model, FSDPModule)
    ranks, syncs, result = _GlooRanks(), {}, {}
    for transport, address in addresses.items():
        endpoint = GenerationEndpoint(addresses=[address], weight_transport=transport)
        servers = TrainerServers(PolicyConfig(path=model_dir), endpoint, [RewardSource()])
        if rank == 0:  # rank 1 has no client: a push that used one there would fail
            servers.generation = GenerationClient([address], weight_transport=transport)
        syncs[transport] = WeightSync(servers)
        syncs[transport].connect(ranks)
    for step in (1, 2):
        if step == 2:
            with torch.no_grad():  # an update: every rank changes its own shards
                for parameter in model.parameters():
                    parameter.mul_(0.5)
        for transport, sync in syncs.items():
            if step == 1:
                sync.ensure_synced(model)  # the trainer's first push (asks what is served)
            else:
                sync.push(model)
            assert sync.version == step
            if rank == 0:
                client = sync.servers.generation
                assert client.transport_of(addresses[transport]) == transport
                assert client.server_info()[0].weights_version == step
                logprobs = [r.logprobs for r in client.generate(PROMPTS, GREEDY)]
                result[f"{transport}/{step}"] = logprobs
    if rank == 0:
        for sync in syncs.values():
            sync.servers.generation.close()
        with open(out, "w") as f:
            json.dump(result, f)


@pytest.mark.timeout(180)
def test_a_two_rank_fsdp2_trainer_pushes_what_one_process_pushes_by_grpc(
    tiny_lm_path, tmp_path
) -> None:
    import contextlib
    import json

    from two_ranks import run_on_two_ranks

    from rpp_lightning.config import PolicyConfig
    from rpp_lightning.rl.policy import load_causal_lm

    # the trainer's policy: the served model plus noise (so a push that moved nothing shows)
    policy = TransformersBackend(str(tiny_lm_path), device="cpu").model
    policy.load_state_dict(perturbed(tiny_lm_path, torch.float32, 7))
    policy.save_pretrained(tmp_path / "policy")
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(running_server(tiny_lm_path, GenerationLimits(**LIMITS)))
            for name in ("reference", *FSDP_TRANSPORTS)
        }
        addresses = {t: servers[t][0].address for t in FSDP_TRANSPORTS}
        run_on_two_ranks(_fsdp_push_worker, str(tmp_path / "policy"), addresses,
                         str(tmp_path / "rank0.json"))  # fmt: skip
        # the reference: the same weights in one process, pushed by the gRPC stream
        reference = load_causal_lm(PolicyConfig(path=str(tmp_path / "policy")))
        server, svc = servers["reference"]
        want = {}
        with GenerationClient([server.address], weight_transport="grpc") as client:
            client.wait_until_ready()
            for step in (1, 2):
                if step == 2:
                    with torch.no_grad():
                        for parameter in reference.parameters():
                            parameter.mul_(0.5)
                client.push_weights(reference.state_dict(), step)
                want[step] = served(client, svc)
        pushed = json.loads((tmp_path / "rank0.json").read_text())
        assert want[1][1] != want[2][1]  # the two versions are told apart by the batch
        for transport in FSDP_TRANSPORTS:
            for step in (1, 2):
                assert pushed[f"{transport}/{step}"] == want[step][1], (transport, step)
            state = servers[transport][1].backend.model.state_dict()
            assert state.keys() == want[2][0].keys()
            assert all(torch.equal(state[k], want[2][0][k]) for k in state), transport
            assert servers[transport][1].scheduler.version == 2


# --- two pushes racing --------------------------------------------------------------------------


def _serving(reader: GenerationClient, servicer) -> tuple[dict, list, set]:
    """What a server serves now, whatever its version: its state dict, a fixed batch's
    log-probs, and the versions stamped on those rollouts."""
    state = {k: v.clone() for k, v in servicer.backend.model.state_dict().items()}
    rollouts = reader.generate(PROMPTS, GREEDY, min_version=0)
    return state, [r.logprobs for r in rollouts], {r.weights_version for r in rollouts}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _held_at_first_tensor(state: dict, prepared, gate) -> TensorStream:
    """`state` as a stream read only after PrepareWeightsUpdate: its first read waits for the
    other push to have prepared too (`prepared`, a barrier), then for `gate`. The push that got
    the lease holds it, mid-push, while the other one is refused and the test looks on."""

    def tensors():
        prepared.wait()
        if not gate.wait(60):
            raise TimeoutError("the gate never opened")
        yield from state.items()

    return TensorStream([(n, t.dtype, tuple(t.shape)) for n, t in state.items()], tensors())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["shm", "collective"])
def test_two_pushes_racing_one_lands_whole_the_other_is_refused(tiny_lm_path, transport):
    import threading

    weights = {v: perturbed(tiny_lm_path, torch.float32, 20 + v) for v in (1, 2, 3)}
    with (
        running_server(tiny_lm_path, GenerationLimits(**LIMITS)) as (server, svc),
        GenerationClient([server.address], weight_transport=transport) as one,
        GenerationClient([server.address], weight_transport=transport) as two,
        GenerationClient([server.address], weight_transport="grpc") as reader,
    ):
        for client in (one, two, reader):
            client.wait_until_ready()
        before = _serving(reader, svc)
        start = threading.Barrier(2, timeout=60)
        prepared = threading.Barrier(3, timeout=60)  # both pushes and this test
        gate = threading.Event()
        outcomes: dict[int, BaseException | None] = {}

        def push(client: GenerationClient, version: int) -> None:
            start.wait()  # both at once
            try:
                stream = _held_at_first_tensor(weights[version], prepared, gate)
                client.push_weights(stream, version)
                outcomes[version] = None
            except BaseException as exc:
                outcomes[version] = exc

        threads = [
            threading.Thread(target=push, args=(client, version), daemon=True)
            for client, version in ((one, 1), (two, 2))
        ]
        for thread in threads:
            thread.start()
        try:
            prepared.wait()  # both have asked; no tensor has moved
            # one holds the transport mid-push: rollouts meanwhile come from the old weights
            state, logprobs, versions = _serving(reader, svc)
            assert _equal(state, before[0]) and logprobs == before[1] and versions == {0}
        finally:
            gate.set()
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), "a push hangs"
        landed = [v for v, error in outcomes.items() if error is None]
        assert len(landed) == 1, outcomes
        winner, loser = landed[0], 3 - landed[0]
        refusal = outcomes[loser]
        assert isinstance(refusal, WeightSyncError), refusal
        assert "RESOURCE_EXHAUSTED" in str(refusal), refusal
        # the winner's weights, every tensor of them, stamped with the winner's version
        state, logprobs, versions = _serving(reader, svc)
        assert _equal(state, weights[winner])
        assert all(not torch.equal(state[k], weights[loser][k]) for k in state)
        assert logprobs != before[1] and versions == {winner}
        assert svc.scheduler.version == winner == reader.server_info()[0].weights_version
        # the refused client pushes again, by its transport, and that lands
        refused = one if loser == 1 else two
        refused.push_weights(weights[3], 3)
        assert refused.transport_of(server.address) == transport
        state, _, versions = _serving(reader, svc)
        assert _equal(state, weights[3]) and versions == {3} and svc.scheduler.version == 3


def test_a_collective_lease_a_dead_sender_never_used_expires(tiny_lm_path) -> None:
    from generation_helpers import stub_for

    from rpp_lightning.weight_transport.sender import OutOfBandSender, Target

    with (
        running_server(tiny_lm_path, GenerationLimits(update_idle_timeout_s=1.0)) as (s, svc),
        stub_for(s.address) as stub,
        GenerationClient([s.address], weight_transport="collective") as client,
    ):
        client.wait_until_ready()
        # a trainer joins the group and leases it, then dies before its UpdateWeights stream
        state = perturbed(tiny_lm_path, torch.float32, 1)
        specs = [(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
        dead = OutOfBandSender(timeout_s=10)
        assert dead._prepare(Target(0, s.address, "collective", stub), specs, 1).lease_id
        time.sleep(1.5)  # past the lease time
        # the next trainer needs a new rendezvous: the dead one's lease must not block it
        client.push_weights(perturbed(tiny_lm_path, torch.float32, 2), 2)
        assert client.transport_of(s.address) == "collective" and svc.scheduler.version == 2
        dead.close()
