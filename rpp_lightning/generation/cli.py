"""`rpp-generation-server`: serve rpp.v1.GenerationService (placeholder until its issue lands)."""

from __future__ import annotations

import argparse
import sys

from rpp_lightning.serving import add_server_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpp-generation-server",
        description="Serve rollouts of a policy over gRPC (rpp.v1.GenerationService).",
    )
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--model", help="local path of a Hugging Face causal LM")
    add_server_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("rpp-generation-server: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
