"""`rpp-train`: the training CLI (LightningCLI over the REINFORCE++ module)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rpp-train", description="Train with REINFORCE++.")
    parser.add_argument("subcommand", nargs="?", choices=["fit"])
    parser.parse_args(argv)
    print("rpp-train: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
