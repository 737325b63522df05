"""`rpp.v1.GenerationService`: request validation, weight updates and GetInfo, for any backend.

The servicer turns requests into `SampleRow`s (validating every case generation.proto lists),
hands them to the `Scheduler` (one thread owning the backend), and receives UpdateWeights
streams with the `WeightsAssembler`. It raises `StatusError`; the runner (`serving.GrpcServer`)
turns that into the gRPC status.

    servicer = GenerationServicer(TransformersBackend("/models/policy"), GenerationLimits())
    GrpcServer(ServerConfig(port=50051), [servicer.service_spec()]).serve_until_signal()
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc

from rpp_lightning.generation.backend import Backend, SampleResult, SampleRow
from rpp_lightning.generation.scheduler import Scheduler, version_refusal
from rpp_lightning.proto import GENERATION_SERVICE, generation_pb2_grpc
from rpp_lightning.proto import generation_pb2 as pb
from rpp_lightning.rpc.seeds import row_seed
from rpp_lightning.rpc.serving import (
    ServiceSpec,
    StatusError,
    idle_limited,
    invalid_argument,
    quote,
    quote_list,
)
from rpp_lightning.weight_transport.kinds import host_id
from rpp_lightning.weight_transport.receiver import OutOfBandReceiver, ReceiverSettings
from rpp_lightning.weight_transport.shm import sweep_stale
from rpp_lightning.weight_transport.wire import (
    WeightsAssembler,
    WeightsUpdate,
    load_safetensors_dir,
    resolve_under_root,
)

log = logging.getLogger("rpp.generation")

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
MAX_PROMPT_ID_CHARS = 1024
"""Longest Prompt.id (generation.proto): an id labels a prompt, it is not data."""
GREEDY_BELOW_TEMPERATURE = 1e-5
"""A temperature below this is greedy decoding (generation.proto; vLLM draws the same line):
logits divided by 1e-40 overflow to inf, and the softmax of inf is NaN."""


@dataclass
class GenerationLimits:
    """What one generation server accepts."""

    max_new_tokens_limit: int = 1024
    """Largest max_new_tokens a request may ask for."""
    max_batch_size: int = 64
    """Rows (prompts x n) generated together in one forward batch."""
    max_samples_per_request: int = 4096
    """Largest prompts x n of one request (bounds the memory one call can claim)."""
    weights_root: str | None = None
    """Directory under which safetensors_dir updates may load; None refuses them."""
    update_idle_timeout_s: float = 60.0
    """An UpdateWeights stream silent this long is dropped (DEADLINE_EXCEEDED): a stalled
    sender must not hold a receiving slot, and the update buffers, forever."""
    collective_host: str = ""
    """Host announced for collective weight transfers ("" = the one the trainer dialled)."""
    max_concurrent_updates: int = 2
    """UpdateWeights streams received at once (each buffers up to a model's weights); more are
    RESOURCE_EXHAUSTED. Swaps are applied one at a time whatever this is."""

    def validate(self) -> None:
        """Raise one ValueError listing every problem."""
        problems = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in (
                "max_new_tokens_limit",
                "max_batch_size",
                "max_samples_per_request",
                "max_concurrent_updates",
            )
            if getattr(self, name) < 1
        ]
        if not self.update_idle_timeout_s > 0:
            problems.append(f"update_idle_timeout_s must be > 0, got {self.update_idle_timeout_s}")
        if problems:
            raise ValueError("invalid generation limits:\n  " + "\n  ".join(problems))


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Generate / UpdateWeights / GetInfo over one backend."""

    def __init__(self, backend: Backend, limits: GenerationLimits | None = None) -> None:
        self.limits = limits or GenerationLimits()
        self.limits.validate()
        self.backend = backend
        self.info = backend.info()
        self.shapes = backend.state_dict_shapes()
        self.scheduler = Scheduler(backend, self.limits.max_batch_size)
        # Streams are received side by side, so one stalled sender cannot hold up another's
        # update; the scheduler applies the swaps one at a time, in the order they complete.
        self._receiving = threading.BoundedSemaphore(self.limits.max_concurrent_updates)
        sweep_stale()  # shared-memory files of servers killed before they could remove them
        self.receiver = OutOfBandReceiver(
            self.shapes,
            ReceiverSettings(
                device=self.info.device,
                lease_s=self.limits.update_idle_timeout_s,
                whole_model=self.info.whole_model_updates,
                collective_host=self.limits.collective_host,
            ),
        )

    def service_spec(self) -> ServiceSpec:
        """How `GrpcServer` registers this servicer."""
        return ServiceSpec(
            self, generation_pb2_grpc.add_GenerationServiceServicer_to_server, GENERATION_SERVICE
        )

    def close(self) -> None:
        """Stop the generation thread (after queued work); remove shared-memory files."""
        self.scheduler.close()
        self.receiver.close()

    # --- Generate -------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        rows = self.rows_of(request)
        has = request.HasField
        required = request.required_weights_version if has("required_weights_version") else None
        minimum = request.min_weights_version if has("min_weights_version") else None
        if required is not None and minimum is not None:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "set at most one of required_weights_version and min_weights_version",
            )
        refusal = version_refusal(required, minimum, self.scheduler.version)
        if refusal is not None:  # fail fast; checked again when the rows run
            raise refusal
        # Set when the call ends (hang-up, cancel, deadline: gRPC's callback) or when this
        # handler stops waiting; the scheduler then drops the call's rows at the next step.
        # Both, since gRPC's own notice can lag its deadline by a busy server's scheduling.
        gone = threading.Event()
        if not context.add_callback(gone.set):
            gone.set()
        future = self.scheduler.submit(rows, required, lambda: not gone.is_set(), minimum)
        remaining = context.time_remaining()  # a huge number when the client set no deadline
        try:
            results, version = future.result(
                timeout=remaining if remaining is not None and remaining < 1e7 else None
            )
        except FutureTimeout:
            gone.set()
            future.cancel()
            raise StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed") from None
        return self._response(request, results, version)

    def rows_of(self, request: pb.GenerateRequest) -> list[SampleRow]:
        """The validated sample rows of a request, prompt-major (INVALID_ARGUMENT otherwise)."""
        s, limits, info = request.sampling, self.limits, self.info
        if not request.prompts:
            raise invalid_argument("no prompts: send at least one")
        if s.n < 1:
            raise invalid_argument("sampling.n must be at least 1")
        if len(request.prompts) * s.n > limits.max_samples_per_request:
            raise invalid_argument(
                f"{len(request.prompts)} prompts x n={s.n} exceeds this server's "
                f"{limits.max_samples_per_request} samples per request"
            )
        if not 1 <= s.max_new_tokens <= limits.max_new_tokens_limit:
            raise invalid_argument(
                f"sampling.max_new_tokens must be in 1..{limits.max_new_tokens_limit}, "
                f"got {s.max_new_tokens}"
            )
        if not math.isfinite(s.temperature) or s.temperature < 0:
            raise invalid_argument(f"sampling.temperature must be >= 0, got {s.temperature}")
        top_p = s.top_p or 1.0  # 0 (unset) disables nucleus sampling
        if not 0 < top_p <= 1:  # also refuses NaN
            raise invalid_argument(f"sampling.top_p must be in (0, 1], got {s.top_p}")
        bad_stop = [t for t in s.stop_token_ids if t >= info.vocab_size]
        if bad_stop:
            raise invalid_argument(
                f"stop_token_ids {quote_list(bad_stop)} are outside the vocabulary "
                f"(size {info.vocab_size})"
            )
        if info.max_temperature is not None and s.temperature > info.max_temperature:
            raise invalid_argument(
                f"sampling.temperature {s.temperature:g}: the {info.backend} backend samples at "
                f"temperatures up to {info.max_temperature:g}"
            )
        temperature = 0.0 if s.temperature < GREEDY_BELOW_TEMPERATURE else s.temperature
        seed = s.seed if s.HasField("seed") else secrets.randbits(63)
        rows = []
        for p, prompt in enumerate(request.prompts):
            self._check_prompt(p, prompt, s.max_new_tokens)
            for j in range(s.n):
                rows.append(
                    SampleRow(
                        prompt=list(prompt.token_ids),
                        max_new_tokens=s.max_new_tokens,
                        seed=row_seed(seed, p, j),
                        temperature=temperature,
                        top_p=top_p,
                        top_k=s.top_k,
                        stop_token_ids=tuple(s.stop_token_ids),
                    )
                )
        return rows

    def _check_prompt(self, index: int, prompt: pb.Prompt, max_new_tokens: int) -> None:
        info, label = self.info, f"prompt {index} (id {quote(prompt.id)})"
        if len(prompt.id) > MAX_PROMPT_ID_CHARS:
            raise invalid_argument(
                f"{label}: the id has {len(prompt.id)} characters; at most {MAX_PROMPT_ID_CHARS}"
            )
        if not prompt.token_ids:
            raise invalid_argument(f"{label} is empty")
        too_big = max(prompt.token_ids)
        if too_big >= info.vocab_size:
            raise invalid_argument(
                f"{label}: token id {too_big} is outside the vocabulary (size {info.vocab_size})"
            )
        if len(prompt.token_ids) + max_new_tokens > info.max_model_len:
            raise invalid_argument(
                f"{label}: {len(prompt.token_ids)} prompt tokens + max_new_tokens "
                f"{max_new_tokens} exceed the model's context {info.max_model_len}"
            )

    def _response(
        self, request: pb.GenerateRequest, results: list[SampleResult], version: int
    ) -> pb.GenerateResponse:
        n = request.sampling.n
        response = pb.GenerateResponse(weights_version=version)
        for p, prompt in enumerate(request.prompts):
            entry = response.results.add(prompt_id=prompt.id)
            for result in results[p * n : (p + 1) * n]:
                entry.completions.add(
                    token_ids=result.token_ids,
                    logprobs=result.logprobs,
                    finish_reason=_FINISH[result.finish_reason],
                    weights_version=version,
                )
        return response

    # --- UpdateWeights ----------------------------------------------------------------------

    def UpdateWeights(self, request_iterator, context) -> pb.UpdateWeightsResponse:
        if not self._receiving.acquire(blocking=False):
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.limits.max_concurrent_updates} UpdateWeights streams are being received "
                "already; retry when one has ended",
            )
        try:
            update, complete, release = self._receive(request_iterator, context)
        finally:
            self._receiving.release()
        try:
            if not context.is_active():  # the client gave up while we validated: do not apply
                raise StatusError(grpc.StatusCode.CANCELLED, "call ended; the old weights stay")
            future = self.scheduler.swap(update.tensors, update.target_version, complete, release)
        except BaseException:
            release(False)
            raise
        version = future.result()
        return pb.UpdateWeightsResponse(
            weights_version=version, num_tensors=len(update.tensors), num_bytes=update.num_bytes
        )

    def _receive(self, request_iterator, context):
        """The whole update of one stream, validated, in memory; nothing is applied here. With
        it: the shared-memory region the backend may adopt (or None), and the release of the
        update's lease, to call once the swap is over (see weight_transport.receiver)."""
        messages = idle_limited(request_iterator, self.limits.update_idle_timeout_s)
        complete, release = None, _no_lease
        try:
            first = next(messages, None)
            if first is not None and first.WhichOneof("item") == "header" and first.header.lease_id:
                update, complete, release = self.receiver.receive(first.header, messages)
            else:
                assembler = WeightsAssembler(self.shapes, self.scheduler.version)
                update = assembler.assemble(itertools.chain([first] if first else [], messages))
        except StatusError:
            raise
        except Exception as exc:
            if context.is_active():
                raise
            # The client broke off the stream: nothing was applied.
            log.warning("UpdateWeights stream broken off (%s); weights unchanged", exc)
            raise StatusError(
                grpc.StatusCode.CANCELLED, "stream broken off; the old weights stay"
            ) from exc
        try:
            self._check_whole(update)
        except BaseException:
            release(False)
            raise
        return update, complete, release

    def _check_whole(self, update: WeightsUpdate) -> None:
        if update.safetensors_dir:
            directory = resolve_under_root(update.safetensors_dir, self.limits.weights_root)
            update.tensors = load_safetensors_dir(directory, self.shapes)
            update.num_bytes = sum(t.nbytes for t in update.tensors.values())
        missing = sorted(self.shapes.keys() - update.tensors.keys())
        if self.info.whole_model_updates and missing:
            raise invalid_argument(
                f"the {self.info.backend} backend takes whole-model updates; {len(missing)} of "
                f"{len(self.shapes)} tensors are missing, e.g. {quote_list(missing, 3)}; the old "
                "weights stay"
            )

    def PrepareWeightsUpdate(
        self, request: pb.PrepareWeightsUpdateRequest, context
    ) -> pb.PrepareWeightsUpdateResponse:
        return self.receiver.prepare(request, self.scheduler.version)

    # --- GetInfo ----------------------------------------------------------------------------

    def GetInfo(self, request: pb.GenerationInfoRequest, context) -> pb.GenerationServerInfo:
        info = self.info
        return pb.GenerationServerInfo(
            model=info.model,
            backend=info.backend,
            weights_version=self.scheduler.version,
            vocab_size=info.vocab_size,
            max_new_tokens_limit=self.limits.max_new_tokens_limit,
            max_model_len=info.max_model_len,
            eos_token_ids=list(info.eos_token_ids),
            host_id=host_id(),
            weight_transports=self.receiver.accepted(),
        )


def _no_lease(adopted: bool) -> None:
    """The release of a streamed update: it holds no lease."""
