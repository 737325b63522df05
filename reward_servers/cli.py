"""`rpp-reward-server`: serve a verifier or a preference model as rpp.v1.RewardService.

    rpp-reward-server math --port 50051
    rpp-reward-server math --port 50051 --verifier-args workers=8 timeout_s=10 format_reward=0.1
    rpp-reward-server preference --model /models/my-rm --port 50052
    rpp-reward-server --verifier my_pkg.my_module:MyVerifier --verifier-args '{"threshold": 0.5}'
    python -m reward_servers.cli math --port 0     # prints "listening on 127.0.0.1:PORT"

Every kind runs behind the same `RewardServicer` and `rpp_lightning.rpc.serving.GrpcServer` (TLS,
token, health, reflection, limits, SIGTERM drain: see `--help`). Exit code 2: bad arguments or a
verifier that cannot be loaded or built.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from reward_servers.base import Verifier
from reward_servers.servicer import RequestLimits, RewardServicer
from rpp_lightning.rpc.server_config import add_server_arguments, server_config_from_args
from rpp_lightning.rpc.serving import GrpcServer, configure_logging, die_with_parent_if_asked

BUILTIN = {
    "math": "reward_servers.math_verifier:MathVerifier",
    "preference": "reward_servers.preference:PreferenceModel",
}
"""Short names of the verifiers shipped here; --verifier takes any other module:Class."""

log = logging.getLogger("rpp.reward")


class UsageError(Exception):
    """A problem with the command line or the verifier it names (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpp-reward-server",
        description="Serve a reward function over gRPC (rpp.v1.RewardService).",
    )
    parser.add_argument(
        "kind", nargs="?", choices=sorted(BUILTIN), help="a built-in scorer (or use --verifier)"
    )
    parser.add_argument("--verifier", help="module:Class of your own Verifier subclass")
    parser.add_argument("--model", help="model directory (preference)")
    parser.add_argument(
        "--verifier-args",
        nargs="+",
        default=[],
        metavar="ARG",
        help="constructor arguments: one JSON object, or key=value pairs (values parsed as "
        "JSON when they can be). math: workers, timeout_s, correct_reward, wrong_reward, "
        "format_reward, fallbacks. preference: max_length, token_budget, device, dtype",
    )
    limits = RequestLimits()
    parser.add_argument(
        "--max-samples", type=int, default=limits.max_samples, help="most samples per request"
    )
    parser.add_argument(
        "--max-chars",
        type=int,
        default=limits.max_chars,
        help="longest string in a sample, in characters",
    )
    parser.add_argument("--log-level", default="INFO")
    add_server_arguments(parser)
    return parser


def parse_verifier_args(items: list[str]) -> dict[str, Any]:
    """`['{"a": 1}']` or `['a=1', 'b=x']` -> {"a": 1, "b": "x"}."""
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            return json.loads(items[0])
        except json.JSONDecodeError as exc:
            raise UsageError(f"--verifier-args is not valid JSON: {exc}") from exc
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--verifier-args: expected key=value, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value  # a bare string such as device=cpu
    return kwargs


def load_verifier_class(path: str) -> type[Verifier]:
    """Import `module:Class` and check it is a Verifier subclass."""
    module_name, sep, class_name = path.partition(":")
    if not sep or not module_name or not class_name:
        raise UsageError(f"--verifier must look like my_pkg.my_module:MyVerifier, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import verifier module {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UsageError(f"module {module_name!r} has no attribute {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Verifier)):
        raise UsageError(f"{path} is not a subclass of reward_servers.base.Verifier")
    return cls


def build_verifier(args: argparse.Namespace) -> Verifier:
    """The verifier the arguments name, constructed."""
    if bool(args.kind) == bool(args.verifier):
        raise UsageError("give exactly one of: a kind (math, preference) or --verifier")
    kwargs = parse_verifier_args(args.verifier_args)
    if args.kind == "preference":
        if not args.model:
            raise UsageError("preference needs --model PATH")
        kwargs["model_path"] = args.model
    elif args.model:
        raise UsageError("--model is only for the preference kind")
    cls = load_verifier_class(BUILTIN.get(args.kind) or args.verifier)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, OSError) as exc:  # bad arguments, missing model files
        raise UsageError(f"cannot build {cls.__name__}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    die_with_parent_if_asked()
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = server_config_from_args(args)
        config.validate()
        verifier = build_verifier(args)
    except (UsageError, ValueError) as exc:
        print(f"rpp-reward-server: error: {exc}", file=sys.stderr)
        return 2
    limits = RequestLimits(max_samples=args.max_samples, max_chars=args.max_chars)
    try:
        server = GrpcServer(config, [RewardServicer(verifier, limits).spec()])
        server.serve_until_signal()
    except OSError as exc:  # the port is taken, the interface does not exist
        print(f"rpp-reward-server: error: {exc}", file=sys.stderr)
        return 1
    finally:
        verifier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
