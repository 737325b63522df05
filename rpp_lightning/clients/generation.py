"""The trainer's side of generation: spread prompts over replicas, check versions, push weights.

    with GenerationClient(["gen-0:50051", "gen-1:50051"]) as client:
        client.wait_until_ready()
        client.push_weights(policy.state_dict(), version=step)
        rollouts = client.generate(prompt_ids, SamplingConfig(n=4, seed=step))

One channel per replica (not gRPC round-robin): weights must reach every replica explicitly, and
prompts are spread deterministically. With a seed, the prompts of a call are split into contiguous
pieces and the piece starting at prompt k is sent with seed `base + k`; the server seeds prompt i
of a request with `seed + i` (see `backend.row_seed`), so every prompt's tokens depend only on the
seed and its index in the call, not on the number of replicas or on which one serves it (a retry
on another replica returns the same tokens).

Faults (`replicas.ReplicaSet`): a piece whose replica is lost, hung or overloaded goes to the next
replica, with backoff once none is left, within the failure policy's retry budget. A replica that
serves another weights version than the call requires (one restarted at version 0) refuses before
generating; its pieces go to the replicas that serve the right version, and it is out of service
until a push reaches it. When every replica refused, StaleWeightsError tells the trainer to push.
A push reaches every replica it can: the ones it cannot reach are out of service until one does,
and the push fails only when no replica took it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from rpp_lightning.proto import GENERATION_SERVICE, generation_pb2_grpc
from rpp_lightning.proto import generation_pb2 as pb
from rpp_lightning.rpc.channels import ChannelConfig, start_calls
from rpp_lightning.rpc.failures import FailurePolicy, describe
from rpp_lightning.rpc.replicas import ReplicaSet
from rpp_lightning.rpc.seeds import mix_seed
from rpp_lightning.rpc.serving import server_seconds
from rpp_lightning.weight_transport.kinds import NAMES as TRANSPORT_NAMES
from rpp_lightning.weight_transport.sender import (
    OutOfBandSender,
    Target,
    TensorStream,
    choose,
    named_specs,
)
from rpp_lightning.weight_transport.wire import directory_update_requests, iter_update_requests

log = logging.getLogger("rpp.generation.client")

_MASK64 = (1 << 64) - 1
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class StaleWeightsError(RuntimeError):
    """A replica served (or would have served) a weights version other than the expected one."""


class WeightSyncError(RuntimeError):
    """A weight push failed on one or more replicas (the message names them)."""


@dataclass
class SamplingConfig:
    """How to sample; mirrors rpp.v1.SamplingParams."""

    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 disables."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    max_new_tokens: int = 256
    """Largest number of tokens per sample."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Stop after any of these (besides the model's EOS)."""
    seed: int | None = None
    """Same seed, prompts, weights and parameters give the same tokens. None draws one."""


@dataclass
class Rollout:
    """One sampled response to one prompt."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    """The server's log-probability of each token (raw model distribution, no temperature)."""
    finish_reason: str
    """"stop" or "length"."""
    weights_version: int


class GenerationClient:
    """Talks to one or more generation server replicas."""

    def __init__(
        self,
        addresses: list[str],
        channel: ChannelConfig | None = None,
        timeout_s: float = 600.0,
        max_prompts_per_call: int = 64,
        policy: FailurePolicy | None = None,
        weight_transport: str = "auto",
    ) -> None:
        """`weight_transport`: how pushes move the tensors (GenerationEndpoint.weight_transport:
        auto, grpc, shm, cuda_ipc, collective); `transport_of` says what each replica got."""
        if not addresses:
            raise ValueError("GenerationClient needs at least one server address")
        if max_prompts_per_call < 1:
            raise ValueError("max_prompts_per_call must be >= 1")
        base = channel or ChannelConfig()
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self.max_prompts_per_call = max_prompts_per_call
        self.replicas = ReplicaSet(
            "generation",
            dataclasses.replace(base, addresses=self.addresses, timeout_s=timeout_s),
            generation_pb2_grpc.GenerationServiceStub,
            GENERATION_SERVICE,
            policy,
        )
        self._metadata = self.replicas.metadata
        self.last_server_s = 0.0
        """Server-side seconds of the last `generate` (its slowest parallel call)."""
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.replicas)))
        self._version: int | None = None
        if weight_transport not in TRANSPORT_NAMES:
            raise ValueError(
                f"weight_transport must be one of {TRANSPORT_NAMES}, got {weight_transport!r}"
            )
        self.weight_transport = weight_transport
        self._transports: dict[str, str] = {}  # address -> the transport its pushes take
        self._sender = OutOfBandSender(timeout_s)

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel and the worker threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sender.close()
        self.replicas.close()

    def wait_until_ready(self, timeout_s: float = 120.0) -> None:
        """Block until every replica reports SERVING, then read (and cross-check) the version."""
        self.replicas.wait_until_serving(timeout_s, service=GENERATION_SERVICE)
        self._version = None
        _ = self.version

    @property
    def version(self) -> int:
        """The last version pushed, or the one every replica serves (they must agree)."""
        if self._version is None:
            versions = {info.weights_version for info in self.server_info()}
            if len(versions) != 1:
                raise StaleWeightsError(f"replicas serve different weights versions: {versions}")
            self._version = versions.pop()
        return self._version

    def server_info(self) -> list[pb.GenerationServerInfo]:
        """GetInfo of every replica, in address order."""
        request = pb.GenerationInfoRequest()

        def get_info(stub, timeout: float) -> pb.GenerationServerInfo:
            return stub.GetInfo(request, timeout=min(timeout, 60.0), metadata=self._metadata)

        calls = start_calls(
            self._pool,
            [
                functools.partial(self.replicas.call, get_info, replicas=[i])
                for i in self.replicas.indexes()
            ],
        )
        return [call.result() for call in calls]

    # --- generation ------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        expected_version: int | None = None,
        prompt_offset: int = 0,
        min_version: int | None = None,
    ) -> list[Rollout]:
        """`len(prompts) * sampling.n` rollouts, prompt-major.

        `expected_version` defaults to the last version this client pushed (or read); when known,
        a replica serving another version fails the call with StaleWeightsError. With
        `min_version` instead, any version from it on is accepted (asynchronous training: a push
        may land before the request runs), and only an older one is refused.
        `prompt_offset` is the index of `prompts[0]` in a larger logical batch split over calls
        or ranks: prompt k is sampled as prompt `prompt_offset + k` of that batch, so with the
        same seed the tokens do not depend on how the batch was split.
        """
        if not prompts:
            return []
        if min_version is None:
            expected = self._version if expected_version is None else expected_version
        elif expected_version is not None:
            raise ValueError("give at most one of expected_version and min_version")
        else:
            expected = None
        base = mix_seed(sampling.seed) if sampling.seed is not None else secrets.randbits(63)
        pieces = self._split(len(prompts))
        thunks = []
        for number, (start, stop) in enumerate(pieces):
            request = pb.GenerateRequest(
                prompts=[pb.Prompt(id=str(i), token_ids=prompts[i]) for i in range(start, stop)],
                sampling=_sampling_proto(sampling, (base + prompt_offset + start) & _MASK64),
                required_weights_version=expected,
                min_weights_version=min_version,
            )
            thunks.append(
                functools.partial(
                    self.replicas.call,
                    lambda stub, t, r=request: stub.Generate.with_call(
                        r, timeout=t, metadata=self._metadata
                    ),
                    first=number,
                    refuse=_stale_refusal,
                )
            )
        calls = start_calls(self._pool, thunks)
        rollouts = []
        self.last_server_s = 0.0
        for (start, stop), call in zip(pieces, calls, strict=True):
            try:
                response, grpc_call = call.result()
                # calls run in parallel: the slowest one's server time bounds the phase
                self.last_server_s = max(self.last_server_s, server_seconds(grpc_call))
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise StaleWeightsError(exc.details()) from exc
                raise
            rollouts += _rollouts(response, start, stop, sampling.n, expected, min_version)
        return rollouts

    def _split(self, count: int) -> list[tuple[int, int]]:
        """Contiguous [start, stop) pieces: at least one per replica, at most max per call."""
        pieces = max(-(-count // self.max_prompts_per_call), min(len(self.replicas), count))
        bounds = [count * k // pieces for k in range(pieces + 1)]
        return list(itertools.pairwise(bounds))

    # --- weights ----------------------------------------------------------------------------

    def push_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]]
        | Mapping[str, torch.Tensor]
        | TensorStream,
        version: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Send tensors to every replica, each by its transport (`transport_of`); all must
        commit `version`.

        Servers refuse a dtype other than the one they serve (bf16 on GPU by default, fp32 on
        CPU): pass `dtype` to cast floating-point tensors on the way (it also halves the bytes
        sent when casting fp32 to bf16). The tensors are read once, in order (a `TensorStream`
        may produce them one at a time); replicas pushed by the gRPC stream read a CPU copy made
        on the way, one 4 MiB chunk at a time; shared memory, CUDA IPC and collective groups take
        each tensor as it comes (weight_transport.sender).
        """
        specs, tensors = named_specs(named_tensors, dtype)
        indexes = self.replicas.indexes()
        on_cuda = any(t.is_cuda for t in _first_tensor(named_tensors))
        targets = []
        for index in indexes:
            address = self.replicas.replicas[index].address
            transport = self._transport_for(index, address, on_cuda)
            if transport != "grpc":
                stub = self.replicas.replicas[index].stub
                targets.append(Target(index, address, transport, stub, self._metadata))
        if not targets:
            cpu = [(name, tensor.to("cpu").contiguous()) for name, tensor in tensors]
            self._push(lambda: iter_update_requests(cpu, version), version)
            return
        outcomes, fallbacks, cpu = self._sender.push(
            targets, specs, tensors, version, keep_cpu_copy=len(targets) < len(indexes)
        )
        for target in targets:
            if target.index in fallbacks:  # one line, once: it is pushed by gRPC from now on
                log.warning("replica %s: %s transport unavailable (%s); pushing by grpc",
                            target.address, target.transport, fallbacks[target.index])  # fmt: skip
                self._transports[target.address] = "grpc"
            elif outcomes[target.index] is not None:  # chosen again at the next push
                self._transports.pop(target.address, None)
        self._push(lambda: iter_update_requests(cpu, version), version, done=outcomes)

    def transport_of(self, address: str) -> str | None:
        """The transport the last push to replica `address` used ("grpc", "shm", "cuda_ipc",
        "collective"); None before the first push to it."""
        return self._transports.get(address)

    def _transport_for(self, index: int, address: str, on_cuda: bool) -> str:
        if address in self._transports:
            return self._transports[address]
        if self.weight_transport == "grpc":
            chosen, why = "grpc", ""
        else:
            try:
                info = self.replicas.attempt(
                    index,
                    lambda stub, t: stub.GetInfo(
                        pb.GenerationInfoRequest(), timeout=min(t, 10.0), metadata=self._metadata
                    ),
                )
            except (grpc.RpcError, RuntimeError):
                return "grpc"  # unreachable now: the push fails there anyway, chosen next time
            chosen, why = choose(self.weight_transport, info, on_cuda)
            if why:
                log.warning("replica %s: %s", address, why)
        self._transports[address] = chosen
        return chosen

    def push_weights_from_dir(self, path: str, version: int) -> None:
        """Ask every replica to load `path/*.safetensors` from its own (shared) file system."""
        self._push(lambda: iter(directory_update_requests(path, version)), version)

    def _push(
        self,
        stream: Callable[[], Iterator[pb.UpdateWeightsRequest]],
        version: int,
        done: Mapping[int, BaseException | None] | None = None,
    ) -> None:
        """Stream to every replica not in `done` (the outcomes of pushes made another way)."""
        done = done or {}
        # every replica in the set now, one found through DNS since the last push included
        indexes = self.replicas.indexes()
        streamed = [i for i in indexes if i not in done]
        calls = dict(zip(streamed, start_calls(
            self._pool, [functools.partial(self._push_one, i, stream, version) for i in streamed]
        ), strict=True))  # fmt: skip
        failures = []
        for index in indexes:
            address = self.replicas.replicas[index].address
            try:
                if index in calls:
                    calls[index].result()
                elif done[index] is not None:
                    raise done[index]
                self.replicas.mark_serving(index)
            except (grpc.RpcError, RuntimeError) as exc:  # RuntimeError: WeightSyncError, budget
                reason = describe(exc)
                failures.append(f"{address}: {reason}")
                self.replicas.mark_lost(index, f"missed weights version {version}: {reason}")
        if len(failures) == len(indexes):
            raise WeightSyncError(
                f"weights version {version} reached no replica:\n  " + "\n  ".join(failures)
            )
        self._version = version

    def _push_one(self, replica: int, stream: Callable, version: int) -> None:
        attempts = 0

        def push(stub, timeout: float) -> None:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # the commit may have landed before the connection dropped
                info = stub.GetInfo(pb.GenerationInfoRequest(), timeout=10, metadata=self._metadata)
                if info.weights_version == version:
                    return
            reply = stub.UpdateWeights(stream(), timeout=timeout, metadata=self._metadata)
            if reply.weights_version != version:
                raise WeightSyncError(f"replica reports version {reply.weights_version}")

        if self.replicas.in_service(replica):
            self.replicas.call(push, replicas=[replica])
        else:  # lost: one attempt, so a dead replica does not hold up every push
            self.replicas.attempt(replica, push)


def _first_tensor(named_tensors) -> list[torch.Tensor]:
    """The first tensor, when it can be looked at without consuming anything (its device)."""
    if isinstance(named_tensors, Mapping):
        return list(itertools.islice(named_tensors.values(), 1))
    if isinstance(named_tensors, TensorStream):
        return [torch.empty(0, device=named_tensors.device)]
    if isinstance(named_tensors, (list, tuple)) and named_tensors:
        return [named_tensors[0][1]]
    return []


def _stale_refusal(exc: grpc.RpcError) -> str | None:
    """A replica that serves another weights version refuses the call (see module docstring)."""
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
        return f"serves another weights version: {exc.details()}"
    return None


def _sampling_proto(sampling: SamplingConfig, seed: int) -> pb.SamplingParams:
    return pb.SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_new_tokens=sampling.max_new_tokens,
        stop_token_ids=sampling.stop_token_ids,
        seed=seed,
    )


def _rollouts(
    response: pb.GenerateResponse,
    start: int,
    stop: int,
    n: int,
    expected: int | None,
    minimum: int | None = None,
) -> list[Rollout]:
    ids = [result.prompt_id for result in response.results]
    if ids != [str(i) for i in range(start, stop)]:
        raise RuntimeError(f"server answered prompts {ids}, asked for {start}..{stop - 1}")
    rollouts = []
    for offset, result in enumerate(response.results):
        if len(result.completions) != n:
            raise RuntimeError(f"server returned {len(result.completions)} completions, not {n}")
        for j, completion in enumerate(result.completions):
            version = completion.weights_version
            if (expected is not None and version != expected) or (
                minimum is not None and version < minimum
            ):
                wanted = f"expected {expected}" if expected is not None else f"at least {minimum}"
                raise StaleWeightsError(
                    f"prompt {start + offset} was generated by weights version {version}, {wanted}"
                )
            rollouts.append(
                Rollout(
                    prompt_index=start + offset,
                    sample_index=j,
                    token_ids=list(completion.token_ids),
                    logprobs=list(completion.logprobs),
                    finish_reason=_FINISH.get(completion.finish_reason, "unspecified"),
                    weights_version=completion.weights_version,
                )
            )
    return rollouts
