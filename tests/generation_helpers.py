"""Shared pieces of the generation-server tests: in-process servers and a reference sampler.

The reference sampler is written independently of the backend's batched loop: one row, no KV
cache, no padding, a full forward over the whole sequence at every step. It shares only the
documented contract with the server (`row_seed` and `row_uniforms`: which random numbers a row
uses), so equality of tokens checks batching, padding, caching and the sampling math together.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import grpc
import torch

from rpp_lightning.generation.backend import Backend
from rpp_lightning.generation.server import GenerationLimits, GenerationServicer
from rpp_lightning.generation.transformers_backend import TransformersBackend, row_uniforms
from rpp_lightning.proto import generation_pb2 as pb
from rpp_lightning.proto import generation_pb2_grpc
from rpp_lightning.rpc.seeds import row_seed
from rpp_lightning.rpc.server_config import ServerConfig
from rpp_lightning.rpc.serving import GrpcServer


@contextlib.contextmanager
def running_server(
    model_path,
    limits: GenerationLimits | None = None,
    config: ServerConfig | None = None,
    backend: Backend | None = None,
) -> Iterator[tuple[GrpcServer, GenerationServicer]]:
    """A real gRPC generation server on a free loopback port, stopped on exit. It serves
    `backend` when given (left running: the caller owns it), else a CPU TransformersBackend of
    `model_path`."""
    if backend is None:
        backend = TransformersBackend(str(model_path), device="cpu")
    servicer = GenerationServicer(backend, limits)
    server = GrpcServer(config or ServerConfig(port=0), [servicer.service_spec()])
    server.start()
    try:
        yield server, servicer
    finally:
        server.stop(grace=0)
        servicer.close()


@contextlib.contextmanager
def stub_for(address: str) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    """A raw stub (for requests the client would refuse to build)."""
    with grpc.insecure_channel(address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def request(prompts: list[list[int]], **sampling) -> pb.GenerateRequest:
    """A GenerateRequest with prompt ids "0", "1", ... and the given SamplingParams fields."""
    sampling.setdefault("n", 1)
    sampling.setdefault("max_new_tokens", 8)
    return pb.GenerateRequest(
        prompts=[pb.Prompt(id=str(i), token_ids=p) for i, p in enumerate(prompts)],
        sampling=pb.SamplingParams(**sampling),
    )


PROMPTS = [[1, 40, 41, 42, 43], [1, 50], [1, 60, 61, 62, 63, 64, 65, 66, 67]]
"""Three prompts of different lengths (so rows of a batch are padded differently)."""


def tokens_of(reply: pb.GenerateResponse, p: int = 0) -> list[list[int]]:
    """The token ids of every completion of prompt `p` of a reply."""
    return [list(c.token_ids) for c in reply.results[p].completions]


def assert_seeds_fix_tokens_however_batched(
    address: str, servicer: GenerationServicer, blocker: pb.GenerateRequest
) -> None:
    """The seed contract, for any backend: the same seed gives the same tokens, another seed
    others; prompt i of a request seeded s samples as prompt 0 of one seeded s + i; and requests
    the batcher merges (sent side by side while `blocker` runs) get the tokens they get alone."""
    params = dict(n=2, temperature=1.0, top_k=30, max_new_tokens=16)
    with stub_for(address) as stub:
        alone = [stub.Generate(request([p], seed=7 + i, **params)) for i, p in enumerate(PROMPTS)]
        again = stub.Generate(request(PROMPTS[:1], seed=7, **params))
        other_seed = stub.Generate(request(PROMPTS[:1], seed=8, **params))
        together = stub.Generate(request(PROMPTS, seed=7, **params))
        before = servicer.scheduler.batches_run
        replies: dict[int, pb.GenerateResponse] = {}
        threads = [threading.Thread(target=lambda: stub.Generate(blocker))]
        threads += [
            threading.Thread(
                target=lambda i=i: replies.__setitem__(
                    i, stub.Generate(request([PROMPTS[i % 3]], seed=7 + i % 3, **params))
                )
            )
            for i in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        batches = servicer.scheduler.batches_run - before
    assert tokens_of(again) == tokens_of(alone[0])
    assert tokens_of(other_seed) != tokens_of(alone[0])
    for i in range(3):
        assert tokens_of(together, i) == tokens_of(alone[i])
    assert sorted(replies) == list(range(6))
    for i, reply in replies.items():
        assert tokens_of(reply) == tokens_of(alone[i % 3])
    assert batches < 7, "concurrent requests were not batched together"


@torch.no_grad()
def reference_sample(
    model,
    prompt: list[int],
    seed: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: tuple[int, ...] = (2,),
) -> tuple[list[int], str]:
    """Tokens and finish reason of one row, sampled the slow obvious way."""
    ids = list(prompt)
    uniforms = row_uniforms(seed, max_new_tokens)
    out: list[int] = []
    for step in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = sampling_probs(logits, temperature, top_k, top_p)
            cdf = probs.double().cumsum(0)
            token = int(torch.searchsorted(cdf, uniforms[step] * cdf[-1], right=True))
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            return out, "stop"
    return out, "length"


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The distribution (V,) one row samples from: raw logits (V,) / temperature, top-k, then
    top-p (the most likely tokens until their mass reaches top_p), not renormalised."""
    scaled = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
        scaled = torch.where(scaled < kth, torch.tensor(float("-inf")), scaled)
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1:
        keep = torch.zeros_like(probs, dtype=torch.bool)
        mass = 0.0
        for index in torch.argsort(probs, descending=True).tolist():
            if mass >= top_p:
                break
            keep[index] = True
            mass += float(probs[index])
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs


@torch.no_grad()
def direct_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log p(token_t | prompt, tokens_<t) from one plain forward over the whole sequence."""
    ids = torch.tensor([prompt + tokens])
    logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return logprobs[positions, torch.tensor(tokens)]


def seeds_of(request_seed: int, prompt_index: int, n: int) -> list[int]:
    """The row seeds of one prompt's n samples (the documented contract)."""
    return [row_seed(request_seed, prompt_index, j) for j in range(n)]
