"""Client side of the runner: one way to open a channel to any rpp server.

The trainer opens one channel per replica (`replicas.ReplicaSet`, which also owns retries); a
hostname with several addresses is balanced by gRPC's own `round_robin`. An address written
`dns:///host:port` (or gRPC's `dns:host:port`) names every replica behind a DNS name, e.g. a
Kubernetes headless Service: `resolve_all` lists them, and ReplicaSet keeps one channel per
address it finds, re-resolving as replicas come and go. Imports grpc only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

T = TypeVar("T")

Resolver = Callable[..., Sequence[tuple[Any, ...]]]
"""`socket.getaddrinfo`'s signature and result: what `resolve_all` asks for a name's addresses."""
_resolver: Resolver = socket.getaddrinfo


@dataclass
class ChannelConfig:
    """Where a service lives and how to talk to it securely."""

    addresses: list[str] = field(default_factory=list)
    """host:port of each replica; several are load-balanced round-robin."""
    timeout_s: float = 60.0
    """Deadline of each attempt of a call (retries: `model.failure_policy`)."""
    tls_ca: str | None = None
    """PEM CA to verify the server; enables TLS."""
    tls_cert: str | None = None
    """PEM client certificate, for mutual TLS."""
    tls_key: str | None = None
    """PEM client key, for mutual TLS."""
    tls_server_name: str | None = None
    """Name to verify in the server certificate when addresses are IPs."""
    token_env: str | None = None
    """Environment variable holding the bearer token to send."""
    token_file: str | None = None
    """File holding the bearer token to send."""
    max_message_mb: int = 256
    """Largest message sent or received, in MiB."""
    dns_refresh_s: float = 30.0
    """Addresses written dns:///host:port are resolved again this often (and at once after a
    replica is lost), so replicas that appear or leave behind the name are followed."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the bearer token, if one is configured."""
        token = None
        if self.token_env:
            token = os.environ.get(self.token_env, "").strip() or None
        elif self.token_file:
            token = Path(self.token_file).read_text().splitlines()[0].strip()
        return (("authorization", f"Bearer {token}"),) if token else ()


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def dns_name(address: str) -> tuple[str, int] | None:
    """(host, port) of an address that names replicas through DNS (`dns:///host:port`, or
    gRPC's short form `dns:host:port`); None for a plain host:port."""
    if not address.startswith("dns:"):
        return None
    rest = address.removeprefix("dns:")
    if rest.startswith("//"):  # dns://[authority]/host:port; the authority picks a DNS server
        authority, slash, rest = rest[2:].partition("/")
        if authority or not slash:
            raise ValueError(
                f"{address!r}: a DNS server in the address is not supported (the system "
                "resolver is used); write dns:///host:port"
            )
    try:
        return _split_host_port(rest)
    except ValueError:
        raise ValueError(f"address must be dns:///host:port, got {address!r}") from None


def resolve_all(host: str, port: int) -> list[str]:
    """Every address behind `host` (IPv4 and IPv6) as `a.b.c.d:port` / `[v6]:port`, in the
    resolver's order, once each. Raises OSError (socket.gaierror) when the name does not resolve.
    """
    found = []
    for family, *_, sockaddr in _resolver(host, port, type=socket.SOCK_STREAM):
        if family == socket.AF_INET:
            found.append(f"{sockaddr[0]}:{port}")
        elif family == socket.AF_INET6:
            found.append(f"[{sockaddr[0]}]:{port}")
    return list(dict.fromkeys(found))


def set_resolver(resolver: Resolver | None) -> Resolver:
    """Answer `dns:` names with `resolver` (getaddrinfo-like; None: the system's again); returns
    the one it replaces. For tests on loopback and for sites with their own service registry:
    resolving names is the operating system's job, what the trainer does with the answers is ours.
    """
    global _resolver
    previous, _resolver = _resolver, resolver or socket.getaddrinfo
    return previous


def resolve_target(addresses: Sequence[str]) -> str:
    """A gRPC target naming every replica: `ipv4:a:p,b:q` (hostnames resolved once here).

    One hostname alone keeps gRPC's DNS resolver (`dns:///host:port`), which re-resolves and
    balances over every address the name has.
    """
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        host, port = dns_name(addresses[0]) or _split_host_port(addresses[0])
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return f"dns:///{host}:{port}"
    v4, v6 = [], []
    for address in addresses:
        host, port = dns_name(address) or _split_host_port(address)
        for family, *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            if family == socket.AF_INET:
                v4.append(f"{sockaddr[0]}:{port}")
            elif family == socket.AF_INET6:
                v6.append(f"[{sockaddr[0]}]:{port}")
            break  # the first address of each host: one endpoint per replica
    if v4 and v6:
        raise ValueError("mixing IPv4 and IPv6 replicas in one channel is not supported")
    return "ipv4:" + ",".join(dict.fromkeys(v4)) if v4 else "ipv6:" + ",".join(dict.fromkeys(v6))


def _service_config(service_names: Sequence[str]) -> str:
    # Retries are not gRPC's: replicas.ReplicaSet retries on another replica and knows which
    # one failed, which gRPC's transparent retries would hide.
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def open_channel(config: ChannelConfig, service_names: Sequence[str]) -> grpc.Channel:
    """A channel to every replica in `config.addresses`, round-robin."""
    max_bytes = config.max_message_mb * 1024 * 1024
    options = [
        ("grpc.service_config", _service_config(service_names)),
        # a restarted server is seen within seconds (gRPC's default backoff grows to 120 s);
        # how long to keep trying is the failure policy's call, not the channel's
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5000),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]
    target = resolve_target(config.addresses)
    if config.tls_ca is None:
        return grpc.insecure_channel(target, options=options)
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(config.tls_ca).read_bytes(),
        private_key=Path(config.tls_key).read_bytes() if config.tls_key else None,
        certificate_chain=Path(config.tls_cert).read_bytes() if config.tls_cert else None,
    )
    return grpc.secure_channel(target, credentials, options=options)


def wait_until_serving(config: ChannelConfig, timeout_s: float = 60.0, service: str = "") -> None:
    """Block until every replica's grpc.health.v1 reports SERVING; TimeoutError otherwise."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    for address in config.addresses:
        single = dataclasses.replace(config, addresses=[address])
        with open_channel(single, ["grpc.health.v1.Health"]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f}s")
                try:
                    reply = stub.Check(
                        health_pb2.HealthCheckRequest(service=service),
                        timeout=min(remaining, 5.0),
                        wait_for_ready=True,
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(min(0.2, max(remaining, 0)))


def start_calls(pool: Executor, calls: Sequence[Callable[[], T]]) -> list[Future[T]]:
    """Start blocking calls in parallel on `pool`; a lone call runs right here instead.

    The common case is one call (one replica, one batch). Handing it to a pool thread and
    waiting for it costs two thread wake-ups, which on a CPU busy with the trainer's compute
    threads can take longer than the loopback round trip itself.
    """
    if len(calls) != 1:
        return [pool.submit(call) for call in calls]
    future: Future[T] = Future()
    try:
        future.set_result(calls[0]())
    except Exception as exc:
        future.set_exception(exc)
    return [future]
