"""Replicas found through DNS (`dns:///name:port`), on loopback with real servers and real gRPC.

Several servers listen on the same port at different loopback addresses (127.0.0.2, 127.0.0.3,
::1, ...), as the pods behind a Kubernetes headless Service do; a name that resolves to them comes
from the system resolver (`localhost`) or from a table given to `channels.set_resolver` (the
operating system's job, replaced so that a test can add and remove addresses). Each reward server
multiplies by its own scale, so a reward says which replica scored it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator

import pytest
from generation_helpers import running_server
from reward_test_verifiers import SleepyLength, serving

from rpp_lightning.clients.generation import GenerationClient, SamplingConfig
from rpp_lightning.clients.rewards import RewardClient, RewardError, RewardQuery
from rpp_lightning.config import RewardSource
from rpp_lightning.rpc import channels
from rpp_lightning.rpc.channels import ChannelConfig, dns_name
from rpp_lightning.rpc.failures import FailurePolicy
from rpp_lightning.rpc.server_config import ServerConfig

PATIENT = FailurePolicy(retry_budget_s=20.0, initial_backoff_s=0.05, max_backoff_s=0.2)
CHUNKS = 8  # the reward client sends 128 samples per call, call k starting at replica k


class Names:
    """getaddrinfo for the names in `table` (the system's for any other); [] = no such name."""

    def __init__(self) -> None:
        self.table: dict[str, list[str]] = {}

    def __call__(self, host: str, port: int, family: int = 0, type: int = 0, *args):
        if host not in self.table:
            return socket.getaddrinfo(host, port, family, type, *args)
        if not self.table[host]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in self.table[host]
        ]


@pytest.fixture
def names() -> Iterator[Names]:
    table = Names()
    previous = channels.set_resolver(table)
    yield table
    channels.set_resolver(previous)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@contextlib.contextmanager
def reward_servers(hosts: list[str], scales: list[float]) -> Iterator[tuple[int, dict]]:
    """A SleepyLength server per host, all on one port; yields (port, {host: its server})."""
    for _ in range(5):  # another process may hold that port on one of the other addresses
        stack = contextlib.ExitStack()
        try:
            started, port = {}, 0  # the first host picks a free port, the others bind it too
            for host, scale in zip(hosts, scales, strict=True):
                config = ServerConfig(host=host, port=port)
                started[host] = stack.enter_context(serving(SleepyLength(scale=scale), config))
                port = started[host].port
        except OSError:
            stack.close()
            continue
        with stack:
            yield port, started
        return
    raise RuntimeError(f"no port free on every one of {hosts}")


def scorers(client: RewardClient) -> set[float]:
    """Score CHUNKS calls' worth of one-character responses; the scales of the replicas hit."""
    queries = [RewardQuery(prompt="p", response="x") for _ in range(128 * CHUNKS)]
    return set(client.score(queries).total)


def reward_client(address: str, refresh_s: float, policy: FailurePolicy = PATIENT) -> RewardClient:
    source = RewardSource(name="math", addresses=[address], dns_refresh_s=refresh_s, timeout_s=5)
    return RewardClient([source], policy)


def test_dns_address_forms() -> None:
    assert dns_name("dns:///math.ns.svc.cluster.local:50051") == (
        "math.ns.svc.cluster.local",
        50051,
    )
    assert dns_name("dns:math:50051") == ("math", 50051)  # gRPC's short form
    assert dns_name("math:50051") is None and dns_name("10.0.0.1:50051") is None
    with pytest.raises(ValueError, match="DNS server in the address is not supported"):
        dns_name("dns://8.8.8.8/math:50051")
    with pytest.raises(ValueError, match="dns:///host:port"):
        dns_name("dns:///math")


def test_every_address_of_a_system_name_gets_calls() -> None:
    """`localhost` through the system resolver: one server per address it has (127.0.0.1, and
    ::1 where /etc/hosts lists it), each scoring a share of the calls."""
    found = {info[4][0] for info in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)}
    hosts = sorted(found)
    scales = [10.0**k for k in range(len(hosts))]
    with reward_servers(hosts, scales) as (port, _):
        client = reward_client(f"dns:///localhost:{port}", refresh_s=30)
        try:
            assert len(client._replicas[0]) == len(hosts)
            assert scorers(client) == set(scales)
        finally:
            client.close()


def test_scale_up_and_scale_down_are_followed_without_errors(names, caplog) -> None:
    """A replica that appears behind the name gets calls after the next resolution; one that
    leaves it (still running, draining) gets none; IPv4 and IPv6 replicas mix."""
    third = "::1" if ipv6_loopback() else "127.0.0.4"
    with reward_servers(["127.0.0.2", "127.0.0.3", third], [1.0, 10.0, 100.0]) as (port, _):
        names.table["math.test"] = ["127.0.0.2", "127.0.0.3"]
        client = reward_client(f"dns:///math.test:{port}", refresh_s=0.3)
        try:
            assert scorers(client) == {1.0, 10.0}
            names.table["math.test"] = ["127.0.0.2", "127.0.0.3", third]
            threading.Event().wait(0.4)
            with caplog.at_level(logging.WARNING, logger="rpp.replicas"):
                assert scorers(client) == {1.0, 10.0, 100.0}  # scaled up
                names.table["math.test"] = ["127.0.0.2", third]
                threading.Event().wait(0.4)
                assert scorers(client) == {1.0, 100.0}  # 127.0.0.3 left: it still runs, unused
            assert len(client._replicas[0]) == 2
            messages = " | ".join(r.getMessage() for r in caplog.records)
            assert f"found {'[::1]' if ':' in third else third}:{port}" in messages
            assert f"left 127.0.0.3:{port}" in messages
        finally:
            client.close()


def test_a_lost_replica_is_resolved_again_at_once(names) -> None:
    """A replica stops and leaves the name while another appears (a rescheduled pod): calls go
    on without error, and the name is resolved right after the loss, not an hour later."""
    with reward_servers(["127.0.0.2", "127.0.0.5"], [1.0, 1000.0]) as (port, started):
        with serving(SleepyLength(scale=10.0), ServerConfig(host="127.0.0.3", port=port)) as gone:
            names.table["math.test"] = ["127.0.0.2", "127.0.0.3"]
            client = reward_client(f"dns:///math.test:{port}", refresh_s=3600)
            assert scorers(client) == {1.0, 10.0}
            gone.stop(grace=0)
        try:
            names.table["math.test"] = ["127.0.0.2", "127.0.0.5"]  # rescheduled elsewhere
            assert scorers(client) <= {1.0, 1000.0}  # 127.0.0.3's calls went elsewhere
            assert scorers(client) == {1.0, 1000.0}
            assert client._replicas[0].addresses == [f"127.0.0.2:{port}", f"127.0.0.5:{port}"]
        finally:
            client.close()
        assert started  # both servers ran through the whole test


def test_a_name_that_resolves_late_is_waited_for_and_one_that_never_does_is_named(
    names,
) -> None:
    with reward_servers(["127.0.0.2"], [1.0]) as (port, _):
        names.table["late.test"] = []  # the Service has no ready pod yet
        client = reward_client(f"dns:///late.test:{port}", refresh_s=30)
        timer = threading.Timer(0.5, lambda: names.table.update({"late.test": ["127.0.0.2"]}))
        timer.start()
        try:
            assert scorers(client) == {1.0}  # within the retry budget
        finally:
            timer.join()
            client.close()

        names.table["never.test"] = []
        brief = FailurePolicy(retry_budget_s=0.5, initial_backoff_s=0.05, max_backoff_s=0.1)
        client = reward_client(f"dns:///never.test:{port}", refresh_s=30, policy=brief)
        try:
            with pytest.raises(
                RewardError, match=r"cannot resolve dns:///never\.test:\d+: gaierror"
            ):
                scorers(client)
        finally:
            client.close()


def test_a_generation_replica_found_later_gets_the_weights_before_it_generates(
    names, tiny_lm_path
) -> None:
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(tiny_lm_path).state_dict()
    with running_server(tiny_lm_path) as (probe, _):
        port = probe.port  # free on 127.0.0.1; taken on .2 and .3 below, or the test fails
    a_config = ServerConfig(host="127.0.0.2", port=port)
    b_config = ServerConfig(host="127.0.0.3", port=port)
    with (
        running_server(tiny_lm_path, config=a_config) as (_, servicer_a),
        running_server(tiny_lm_path, config=b_config) as (_, servicer_b),
    ):
        names.table["gen.test"] = ["127.0.0.2"]
        client = GenerationClient(
            [f"dns:///gen.test:{port}"], channel=ChannelConfig(dns_refresh_s=0.3), policy=PATIENT
        )
        sampling = SamplingConfig(n=2, max_new_tokens=4, seed=7)
        prompts = [[5, 6, 7], [8, 9], [10, 11], [12]]
        try:
            client.wait_until_ready()
            client.push_weights(weights, version=1)
            assert {r.weights_version for r in client.generate(prompts, sampling)} == {1}
            names.table["gen.test"] = ["127.0.0.2", "127.0.0.3"]  # scaled up: b serves version 0
            threading.Event().wait(0.4)
            before_a = servicer_a.scheduler.batches_run
            rollouts = client.generate(prompts, sampling)
            assert {r.weights_version for r in rollouts} == {1}
            assert servicer_b.scheduler.batches_run == 0  # it refused: generated nothing
            assert servicer_a.scheduler.batches_run > before_a
            client.push_weights(weights, version=2)  # the next push reaches it
            assert [i.weights_version for i in client.server_info()] == [2, 2]
            assert {r.weights_version for r in client.generate(prompts, sampling)} == {2}
            assert servicer_b.scheduler.batches_run > 0  # now it takes its share
        finally:
            client.close()
