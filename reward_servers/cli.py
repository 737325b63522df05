"""`rpp-reward-server`: serve rpp.v1.RewardService (placeholder until its issue lands)."""

from __future__ import annotations

import argparse
import sys

from rpp_lightning.serving import add_server_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpp-reward-server",
        description="Serve a reward function over gRPC (rpp.v1.RewardService).",
    )
    parser.add_argument("kind", nargs="?", choices=["math", "preference"])
    parser.add_argument("--verifier", help="module:Class of a user verifier")
    add_server_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("rpp-reward-server: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
