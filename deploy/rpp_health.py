#!/usr/bin/env python3
"""`rpp-health HOST:PORT [SERVICE]`: exit 0 when the server's grpc.health.v1 says SERVING.

The images install this file as /usr/local/bin/rpp-health for `docker compose` healthchecks and
for exec probes where Kubernetes' native `grpc:` probe cannot be used (a server with TLS: the
native probe speaks plaintext only). It needs grpcio and grpcio-health-checking, which every
rpp image has (the project's core dependencies), and nothing of the project itself.

    rpp-health 127.0.0.1:50051 rpp.v1.RewardService       # exit 0: SERVING, 1: anything else
    rpp-health 127.0.0.1:50051 --tls-ca /etc/rpp/tls/ca.crt --tls-server-name math
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rpp-health", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="host:port of the server")
    parser.add_argument("service", nargs="?", default="", help='service name ("": the server)')
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--tls-ca", help="PEM CA to verify the server (enables TLS)")
    parser.add_argument("--tls-server-name", help="name to verify in the server certificate")
    args = parser.parse_args(argv)
    if args.tls_ca:
        with open(args.tls_ca, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
        options = []
        if args.tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.tls_server_name))
        channel = grpc.secure_channel(args.address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s
            )
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
