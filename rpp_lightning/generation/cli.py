"""`rpp-generation-server`: serve rollouts of a policy over gRPC (rpp.v1.GenerationService).

    rpp-generation-server --model /models/policy --port 50051                # transformers, CPU/GPU
    rpp-generation-server --backend vllm --model /models/policy --port 50051 # vLLM, GPU or CPU
    rpp-generation-server --model /models/policy --weights-root /shared/ckpt # allow dir updates

Prints `listening on HOST:PORT` once serving; SIGTERM drains in-flight calls, then exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rpp_lightning.rpc.server_config import add_server_arguments, server_config_from_args
from rpp_lightning.rpc.serving import GrpcServer, configure_logging, die_with_parent_if_asked

log = logging.getLogger("rpp.generation")


def build_parser() -> argparse.ArgumentParser:
    """The CLI: model and backend flags, generation limits, then the shared server flags."""
    from rpp_lightning.generation.server import GenerationLimits

    limits = GenerationLimits()
    parser = argparse.ArgumentParser(
        prog="rpp-generation-server",
        description="Serve rollouts of a policy over gRPC (rpp.v1.GenerationService).",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    model.add_argument("--model", required=True, help="local directory of a Hugging Face causal LM")
    model.add_argument(
        "--device",
        default="auto",
        help="transformers: auto, cpu, cuda, cuda:1; vllm: auto or the vLLM build's (cpu, cuda)",
    )
    model.add_argument(
        "--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"
    )
    model.add_argument("--max-model-len", type=int, help="vllm: context length to reserve")
    model.add_argument(
        "--gpu-memory-utilization", type=float, default=0.85, help="vllm: GPU memory fraction"
    )
    model.add_argument(
        "--kv-cache-gib",
        type=float,
        help="vllm: KV cache size in GiB (default: by --gpu-memory-utilization on GPU, "
        "1 GiB on CPU)",
    )
    model.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        help="vllm: no CUDA graphs or torch.compile (default: eager on CPU only)",
    )
    gen = parser.add_argument_group("generation limits")
    gen.add_argument("--max-new-tokens-limit", type=int, default=limits.max_new_tokens_limit)
    gen.add_argument(
        "--max-batch-size",
        type=int,
        default=limits.max_batch_size,
        help="rows (prompts x n) generated together",
    )
    gen.add_argument("--max-samples-per-request", type=int, default=limits.max_samples_per_request)
    gen.add_argument(
        "--weights-root", help="directory under which safetensors_dir updates may load"
    )
    gen.add_argument(
        "--update-idle-timeout-s",
        type=float,
        default=limits.update_idle_timeout_s,
        help="drop an UpdateWeights stream that sends nothing for this long",
    )
    parser.add_argument("--log-level", default="INFO")
    add_server_arguments(parser)
    return parser


def build_backend(args: argparse.Namespace):
    """The backend named by --backend, loaded from --model."""
    if args.backend == "vllm":
        from rpp_lightning.generation.vllm_backend import VLLMBackend, VLLMConfig

        return VLLMBackend(
            VLLMConfig(
                model=args.model,
                dtype=args.dtype,
                device=args.device,
                max_model_len=args.max_model_len,
                gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_gib=args.kv_cache_gib,
                max_num_seqs=args.max_batch_size,
                enforce_eager=args.enforce_eager,
            )
        )
    from rpp_lightning.generation.transformers_backend import TransformersBackend

    return TransformersBackend(args.model, device=args.device, dtype=args.dtype)


def main(argv: list[str] | None = None) -> int:
    die_with_parent_if_asked()
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    from rpp_lightning.generation.server import GenerationLimits, GenerationServicer

    if not (Path(args.model) / "config.json").is_file():
        print(
            f"rpp-generation-server: --model {args.model}: no config.json there "
            "(expected a local Hugging Face model directory)",
            file=sys.stderr,
        )
        return 2
    try:
        limits = GenerationLimits(
            max_new_tokens_limit=args.max_new_tokens_limit,
            max_batch_size=args.max_batch_size,
            max_samples_per_request=args.max_samples_per_request,
            weights_root=args.weights_root,
            update_idle_timeout_s=args.update_idle_timeout_s,
        )
        limits.validate()
        config = server_config_from_args(args)
        config.validate()
        if args.weights_root and not Path(args.weights_root).is_dir():
            raise ValueError(f"--weights-root {args.weights_root} is not a directory")
    except ValueError as exc:
        print(f"rpp-generation-server: {exc}", file=sys.stderr)
        return 2
    try:
        backend = build_backend(args)
    except (OSError, ValueError, ImportError) as exc:
        print(f"rpp-generation-server: could not load {args.model}: {exc}", file=sys.stderr)
        return 2
    servicer = GenerationServicer(backend, limits)
    server = GrpcServer(config, [servicer.service_spec()])
    try:
        server.serve_until_signal()
    finally:
        servicer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
