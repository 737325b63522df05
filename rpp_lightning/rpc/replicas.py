"""Calls to a replicated service that outlive faults: deadlines, a retry budget, lost replicas.

Every remote call the trainer makes (generate, push weights, score) goes through a ReplicaSet:
one channel per replica, so the client knows which replica answered or failed. A failed attempt
(the replica is gone, hung past its deadline, or shedding load) moves the call to the next replica
in service; when none is left, the call waits with exponential backoff and full jitter and tries
them all again, until the retry budget is spent. Then it raises ServerUnavailableError, naming
every address and the last status, and the trainer checkpoints and exits (module.py).

Why a retry never scores or trains on a sample twice: a call's answer is used once, by the one
caller waiting for it; an attempt that failed returned nothing. Scoring is a pure function of its
request and generation of (prompts, seed, weights version), so a re-sent call gets the same answer
it would have got the first time.

Replicas found through DNS: an address `dns:///host:port` (a Kubernetes headless Service) stands
for every address the name resolves to, each a replica of its own. The set resolves it again
every `dns_refresh_s`, right after a replica is lost and before each retry round: an address
that appeared gets a channel and its share of the calls; one that left gets no new calls, and its
channel closes when its last call ends (a draining server finishes what it has). A name that does
not resolve keeps the replicas last found behind it and is tried again within the failure policy.
Indexes of replicas never change (the list only grows, an address that returns reuses its entry),
so a caller holding one while the set changes reaches the replica it meant, or none.
Imports grpc and the standard library only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from rpp_lightning.rpc.channels import (
    ChannelConfig,
    dns_name,
    open_channel,
    resolve_all,
    wait_until_serving,
)
from rpp_lightning.rpc.failures import RETRYABLE, FailurePolicy, ServerUnavailableError, describe

log = logging.getLogger("rpp.replicas")
T = TypeVar("T")

_OPEN: weakref.WeakSet[ReplicaSet] = weakref.WeakSet()
INTERRUPTED = threading.Event()
"""Set by `rpp-train`'s SIGINT handler: a Ctrl-C that lands inside a gRPC call must stop the
run, not turn into a failed attempt that is retried."""


def _close_all() -> None:
    for replicas in list(_OPEN):
        replicas.close()


# At interpreter exit Python joins worker threads (a scoring call in flight) before it runs
# atexit hooks; a call retrying against stopped servers would hold the exit for its whole
# budget. threading's own exit hooks run first, the newest first: close every set there.
getattr(threading, "_register_atexit", lambda _: None)(_close_all)


@dataclass
class _Replica:
    address: str  # host:port it is reached at (an IP address when found through DNS)
    entry: str  # the configured address it comes from: itself, or the dns:/// name
    channel: grpc.Channel | None
    stub: Any
    lost_at: float | None = None  # monotonic time it was marked lost; None = in service
    lost_reason: str = ""
    gone: bool = False  # its address left its DNS name: no new calls go to it
    calls: int = 0  # calls in flight; a gone replica's channel closes when the last one ends


class ReplicaSet:
    """Stubs of every replica of one service, and `call`, which survives their faults."""

    def __init__(
        self,
        name: str,
        config: ChannelConfig,
        stub_class: Callable[[grpc.Channel], Any],
        service_name: str,
        policy: FailurePolicy | None = None,
    ) -> None:
        if not config.addresses:
            raise ValueError(f"{name} has no addresses")
        if config.dns_refresh_s <= 0:
            raise ValueError(f"{name}: dns_refresh_s must be > 0, got {config.dns_refresh_s}")
        self.name, self.config = name, config
        self.policy = policy or FailurePolicy()
        self.metadata = config.metadata()
        self._stub_class, self._service_name = stub_class, service_name
        self._lock = threading.Lock()
        self._closed = threading.Event()  # set by close(): calls stop retrying at once
        self.replicas: list[_Replica] = []
        self._names = {a: dns_name(a) for a in dict.fromkeys(config.addresses)}
        self._found: dict[str, list[str]] = {}  # dns entry -> the addresses it last resolved to
        self._unresolved: dict[str, str] = {}  # dns entry -> why its last resolution failed
        self._resolved_at = -float("inf")
        self._resolve_soon = False  # a replica was lost: resolve before the next attempt
        self._resolving = False
        _OPEN.add(self)
        if any(self._names.values()):
            self.refresh(force=True)
        else:  # a fixed list: one replica per address, for the whole run
            self._update([(entry, entry) for entry in self._names])

    def __len__(self) -> int:
        """Replicas in the set now (found through DNS or listed), lost or not."""
        return sum(not r.gone for r in self.replicas)

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas if not r.gone]

    def indexes(self) -> list[int]:
        """Indexes of the replicas in the set now (after resolving DNS names, when due)."""
        self.refresh()
        return [i for i, r in enumerate(self.replicas) if not r.gone]

    def where(self) -> str:
        """The configured addresses, each DNS name with what it resolved to (for messages)."""
        parts = []
        for entry, name in self._names.items():
            if name is None:
                parts.append(entry)
                continue
            found = ", ".join(self._found.get(entry, [])) or "no address"
            why = f"; {self._unresolved[entry]}" if entry in self._unresolved else ""
            parts.append(f"{entry} (resolved to {found}{why})")
        return ", ".join(parts)

    # --- membership ---------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Resolve the DNS names again if due (`dns_refresh_s` passed, or a replica was lost)."""
        if not any(self._names.values()):
            return
        with self._lock:
            now = time.monotonic()
            due = self._resolve_soon or now - self._resolved_at >= self.config.dns_refresh_s
            if self._resolving or not (due or force):
                return  # another thread is resolving: its answer serves this call too
            self._resolving, self._resolve_soon = True, False
        try:
            wanted = [(entry, a) for entry in self._names for a in self._resolve(entry)]
            self._update(wanted)
        finally:
            with self._lock:
                self._resolving, self._resolved_at = False, time.monotonic()

    def _resolve(self, entry: str) -> list[str]:
        name = self._names[entry]
        if name is None:
            return [entry]
        try:
            found = resolve_all(*name)
            if not found:
                raise OSError("the name has no IPv4 or IPv6 address")
        except OSError as exc:  # socket.gaierror: no such name, DNS unreachable, ...
            reason = f"cannot resolve {entry}: {describe(exc)}"
            if self._unresolved.get(entry) != reason:  # say it once, not at every retry
                known = len(self._found.get(entry, []))
                log.warning(
                    "%s: %s; keeping the %d replica(s) found before", self.name, reason, known
                )
            self._unresolved[entry] = reason
            return self._found.get(entry, [])  # a DNS hiccup is no reason to drop replicas
        if self._unresolved.pop(entry, None) is not None:
            log.warning("%s: %s resolves again", self.name, entry)
        self._found[entry] = found
        return found

    def _update(self, wanted: list[tuple[str, str]]) -> None:
        """Add replicas for addresses that appeared, retire those that left."""
        keep = {address for _, address in wanted}
        added, left = [], []
        with self._lock:
            known = {r.address: r for r in self.replicas}
            for entry, address in wanted:
                replica = known.get(address)
                if replica is not None and not replica.gone:
                    continue
                if replica is None:
                    replica = _Replica(address, entry, None, None)
                    self.replicas.append(replica)
                    known[address] = replica
                if replica.channel is None:  # new, or back after its channel was closed
                    replica.channel = open_channel(self._config_for(replica), [self._service_name])
                    replica.stub = self._stub_class(replica.channel)
                replica.gone, replica.lost_at, replica.lost_reason = False, None, ""
                added.append(address)
            for replica in self.replicas:
                if not replica.gone and replica.address not in keep:
                    replica.gone = True
                    left.append(replica.address)
                    if replica.calls == 0:
                        self._close_channel(replica)
        if not any(self._names.values()):
            return
        if self._resolved_at == -float("inf"):  # the first resolution
            log.info("%s: %s", self.name, self.where())
        elif added or left:
            log.warning(
                "%s: replicas found %s, left %s; now %s",
                self.name,
                ", ".join(added) or "none",
                ", ".join(left) or "none",
                self.where(),
            )

    def _config_for(self, replica: _Replica) -> ChannelConfig:
        single = dataclasses.replace(self.config, addresses=[replica.address])
        name = self._names.get(replica.entry)
        if name is not None and single.tls_server_name is None:  # certificates name the service
            single.tls_server_name = name[0]
        return single

    def _close_channel(self, replica: _Replica) -> None:
        if replica.channel is not None:
            replica.channel.close()
            replica.channel = None

    def _acquire(self, replica: _Replica) -> bool:
        """Count a call in flight on `replica`; False if it left the set (its channel may be
        closed)."""
        with self._lock:
            if replica.gone:
                return False
            replica.calls += 1
            return True

    def _release(self, replica: _Replica) -> None:
        with self._lock:
            replica.calls -= 1
            if replica.gone and replica.calls == 0:
                self._close_channel(replica)

    # --- state of each replica -----------------------------------------------------------------

    def in_service(self, index: int) -> bool:
        replica = self.replicas[index]
        if replica.gone:
            return False
        if replica.lost_at is None:
            return True
        return time.monotonic() - replica.lost_at >= self.policy.revive_after_s

    def mark_lost(self, index: int, reason: str) -> None:
        """Take a replica out of service (its calls go to the others) and say so once."""
        replica = self.replicas[index]
        with self._lock:
            first = replica.lost_at is None and not replica.gone
            replica.lost_at, replica.lost_reason = time.monotonic(), reason
            if first and any(self._names.values()):
                self._resolve_soon = True  # it may have moved: rescheduled to another address
        if first:
            others = len(self) - 1
            log.warning(
                "%s: replica %s lost (%s); %s",
                self.name,
                replica.address,
                reason,
                f"its calls go to the {others} other(s)" if others else "waiting for it",
            )

    def mark_serving(self, index: int) -> None:
        replica = self.replicas[index]
        with self._lock:
            was_lost, replica.lost_at = replica.lost_at is not None, None
        if was_lost and not replica.gone:
            log.warning("%s: replica %s serves again", self.name, replica.address)

    # --- calls ----------------------------------------------------------------------------------

    def attempt(self, index: int, fn: Callable[[Any, float], T]) -> T:
        """`fn(stub, timeout_s)` once on replica `index`, no retry (a push to a lost replica)."""
        replica = self.replicas[index]
        if not self._acquire(replica):
            raise ServerUnavailableError(f"{self.name}: replica {replica.address} left the set")
        try:
            return fn(replica.stub, self.config.timeout_s)
        finally:
            self._release(replica)

    def call(
        self,
        fn: Callable[[Any, float], T],
        first: int = 0,
        replicas: Sequence[int] | None = None,
        refuse: Callable[[grpc.RpcError], str | None] | None = None,
    ) -> T:
        """`fn(stub, timeout_s)` on replica `first` (or the next in service), surviving faults.

        `replicas` limits the call to those indexes (a weight push goes to one replica).
        `refuse(exc)` may name a non-retryable error that still means "this replica cannot
        serve the call" (a stale weights version): the replica is marked lost and the call moves
        on; when a round over the replicas ends with none serving and one refusing, that error
        is raised at once (waiting would not help: the caller must act, e.g. push weights).
        """
        start, round_, last = time.monotonic(), 0, "no attempt"
        refused: set[int] = set()
        refusal: grpc.RpcError | None = None
        while True:
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt
            if self._closed.is_set():
                raise ServerUnavailableError(f"{self.name}: the client was closed ({last})")
            self.refresh()  # when due: replicas may have appeared or left behind a DNS name
            asked = list(replicas) if replicas is not None else range(len(self.replicas))
            candidates = [i for i in asked if not self.replicas[i].gone]
            if replicas is not None and not candidates:  # waiting would not bring them back
                gone = ", ".join(self.replicas[i].address for i in asked)
                raise ServerUnavailableError(f"{self.name}: {gone} left {self.where()}")
            if not candidates:  # a DNS name that resolved to nothing yet: wait and look again
                last = "; ".join(self._unresolved.values()) or f"no replica in {self.where()}"
            shift = first % len(candidates) if candidates else 0
            order = candidates[shift:] + candidates[:shift]
            usable = [i for i in order if i not in refused and self.in_service(i)]
            if not usable:  # every replica lost: try them all after the backoff
                usable = [i for i in order if i not in refused]
            for index in usable:
                replica = self.replicas[index]
                if not self._acquire(replica):
                    continue  # left the set since the round began
                try:
                    result = fn(replica.stub, self.config.timeout_s)
                except grpc.RpcError as exc:
                    if INTERRUPTED.is_set():
                        raise KeyboardInterrupt from exc
                    reason = refuse(exc) if refuse is not None else None
                    if reason is not None:
                        refused.add(index)
                        refusal = exc
                    elif exc.code() in RETRYABLE:
                        reason = describe(exc)
                    else:
                        raise
                    last = f"{replica.address}: {reason}"
                    self.mark_lost(index, reason)
                    continue
                finally:
                    self._release(replica)
                self.mark_serving(index)
                return result
            if refusal is not None:  # none served; one that answered cannot: the caller's turn
                raise refusal
            elapsed = time.monotonic() - start
            wait = self.policy.backoff_s(round_)
            if elapsed + wait > self.policy.retry_budget_s:
                raise ServerUnavailableError(
                    f"{self.name}: no replica of {self.where()} answered within "
                    f"the retry budget ({self.policy.retry_budget_s:g} s); last: {last}"
                )
            with self._lock:  # every replica failed: look again for where they are now
                self._resolve_soon = True
            self._closed.wait(wait)  # a close() (the run is stopping) ends the wait at once
            round_ += 1

    def wait_until_serving(self, timeout_s: float, service: str = "") -> None:
        """Block until every replica in the set reports SERVING (grpc.health.v1), and a DNS
        name has at least one; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while not self.indexes():  # e.g. a Service whose pods are still starting
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name}: no replica in {self.where()} after {timeout_s:g}s"
                )
            with self._lock:
                self._resolve_soon = True
            self._closed.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        for replica in [r for r in self.replicas if not r.gone]:
            remaining = max(deadline - time.monotonic(), 0.1)
            wait_until_serving(self._config_for(replica), remaining, service=service)

    def close(self) -> None:
        """Close every channel; calls in flight end, and none retries any more."""
        self._closed.set()
        with self._lock:
            for replica in self.replicas:
                self._close_channel(replica)
