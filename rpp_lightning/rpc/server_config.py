"""How an rpp server listens and whom it trusts: `ServerConfig` and the CLI flags every server
shares (`--host`, `--port`, `--tls-cert`, `--token-env`, ...). Standard library only.

    parser = argparse.ArgumentParser(); add_server_arguments(parser)
    config = server_config_from_args(parser.parse_args())
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerConfig:
    """How a server listens and whom it trusts. Every rpp server CLI exposes these flags."""

    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default: exposing a server is an explicit choice."""
    port: int = 0
    """Port to bind; 0 picks a free one (printed on start)."""
    max_workers: int = 16
    """Threads serving calls."""
    max_concurrent_rpcs: int = 64
    """Calls in flight beyond this get RESOURCE_EXHAUSTED instead of queueing without bound."""
    max_message_mb: int = 256
    """Largest request or response message, in MiB; larger requests get RESOURCE_EXHAUSTED."""
    grace_s: float = 30.0
    """On SIGTERM, in-flight calls get this long to finish before they are cancelled."""
    tls_cert: str | None = None
    """PEM certificate chain of the server; with tls_key enables TLS."""
    tls_key: str | None = None
    """PEM private key of the server."""
    tls_client_ca: str | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    token_env: str | None = None
    """Name of an environment variable holding the bearer token clients must send."""
    token_file: str | None = None
    """File holding the bearer token (first line). The token itself is never a flag or logged."""

    def validate(self) -> None:
        """Raise one ValueError listing every problem with this configuration."""
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port}")
        if self.max_workers < 1:
            problems.append(f"max_workers must be >= 1, got {self.max_workers}")
        if self.max_concurrent_rpcs < 1:
            problems.append(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        if self.max_message_mb < 1:
            problems.append(f"max_message_mb must be >= 1, got {self.max_message_mb}")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "token_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                problems.append(f"{name}: no such file {path}")
        if self.token_env and not os.environ.get(self.token_env):
            problems.append(f"token_env: environment variable {self.token_env} is unset or empty")
        if problems:
            raise ValueError("invalid server configuration:\n  " + "\n  ".join(problems))

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    def read_token(self) -> str | None:
        """The bearer token clients must present, or None when auth is off."""
        if self.token_env:
            return os.environ[self.token_env].strip()
        if self.token_file:
            return Path(self.token_file).read_text().splitlines()[0].strip()
        return None


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ServerConfig flags (--host, --port, --tls-cert, ...) to a CLI parser."""
    defaults = ServerConfig()
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=defaults.host, help="interface to bind")
    group.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    group.add_argument("--max-workers", type=int, default=defaults.max_workers)
    group.add_argument("--max-concurrent-rpcs", type=int, default=defaults.max_concurrent_rpcs)
    group.add_argument("--max-message-mb", type=int, default=defaults.max_message_mb)
    group.add_argument("--grace-s", type=float, default=defaults.grace_s, help="SIGTERM drain")
    group.add_argument("--tls-cert", help="PEM certificate chain (enables TLS)")
    group.add_argument("--tls-key", help="PEM private key")
    group.add_argument("--tls-client-ca", help="PEM CA that client certificates must chain to")
    group.add_argument("--token-env", help="environment variable holding the bearer token")
    group.add_argument("--token-file", help="file holding the bearer token")


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build a ServerConfig from the flags of `add_server_arguments`."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        max_workers=args.max_workers,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_message_mb=args.max_message_mb,
        grace_s=args.grace_s,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        token_env=args.token_env,
        token_file=args.token_file,
    )
