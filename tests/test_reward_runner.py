"""The runner around every reward server: health, reflection, deadlines, limits, TLS, tokens,
and bad input, against in-process servers on free loopback ports talking real gRPC."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from reward_test_verifiers import (
    ExactMatch,
    SleepyLength,
    WaitsForClient,
    request,
    reward_stub,
    serving,
)

from reward_servers.base import wait_for_futures
from reward_servers.servicer import RequestLimits
from rpp_lightning.proto import reward_pb2
from rpp_lightning.rpc.server_config import ServerConfig


def test_health_reflection_and_info():
    with serving(SleepyLength()) as server, grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "rpp.v1.RewardService"]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"rpp.v1.RewardService", "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol("rpp.v1.RewardService")
        assert descriptor.package == "rpp.v1"
        info = reward_stub(channel).GetInfo(reward_pb2.GetInfoRequest(), timeout=5)
        assert (info.name, info.kind, info.requires_reference) == ("sleepy-length", "test", False)
        assert info.max_samples_per_request == RequestLimits().max_samples


@pytest.mark.timeout(30)
def test_deadline_exceeded_then_keeps_serving():
    with (
        serving(SleepyLength(sleep_s=1.0)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = reward_stub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request(("a", "xx", "")), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stub.Score(request(("b", "xyz", "")), timeout=10).scores[0].reward == 3.0


@pytest.mark.timeout(30)
def test_a_verifier_learns_when_its_client_has_gone():
    """client_gone() is set when the client cancels and when its deadline passes."""
    verifier = WaitsForClient()
    with serving(verifier) as server, grpc.insecure_channel(server.address) as channel:
        stub = reward_stub(channel)
        call = stub.Score.future(request(("a", "x", "")), timeout=20)
        time.sleep(0.3)
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request(("b", "y", "")), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_for(lambda: len(verifier.gone_after_s) == 2, 5)
    cancelled, timed_out = verifier.gone_after_s
    assert 0.2 < cancelled < 5  # at the cancel, not at the 20 s deadline
    assert 0.3 < timed_out < 5


def test_wait_for_futures_returns_at_done_deadline_or_gone():
    gone = threading.Event()
    done, pending = futures.Future(), futures.Future()
    done.set_result(1)
    assert wait_for_futures([done], None, gone) == set()
    start = time.monotonic()
    assert wait_for_futures([done, pending], 0.2, gone) == {pending}
    assert 0.15 < time.monotonic() - start < 2
    threading.Timer(0.2, gone.set).start()
    start = time.monotonic()
    assert wait_for_futures([pending], None, gone) == {pending}
    assert 0.15 < time.monotonic() - start < 2


def test_concurrency_limit_is_resource_exhausted():
    config = ServerConfig(port=0, max_concurrent_rpcs=2)
    with (
        serving(SleepyLength(sleep_s=1.0), config) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = reward_stub(channel)
        calls = [stub.Score.future(request((f"{i}", "x", "")), timeout=10) for i in range(4)]
        codes = []
        for call in calls:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert codes.count(grpc.StatusCode.OK) == 2
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2


@pytest.mark.timeout(30)
def test_bad_input_gets_clear_statuses_and_server_keeps_serving():
    config = ServerConfig(port=0, max_message_mb=1)
    limits = RequestLimits(max_samples=3, max_chars=1000)
    with (
        serving(ExactMatch(), config, limits) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = reward_stub(channel)

        def status_of(req) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(req, timeout=10)
            return err.value.code(), err.value.details()

        invalid = grpc.StatusCode.INVALID_ARGUMENT
        cases = {
            "empty": (reward_pb2.ScoreRequest(), "samples is empty"),
            "empty response": (request(("r1", "", "x")), "empty response in samples 'r1'"),
            "no reference": (request(("r2", "x", "")), "missing in samples 'r2'"),
            "duplicate ids": (request(("d", "x", "x"), ("d", "y", "y")), "duplicate sample ids"),
            "too many": (request(*[(f"{i}", "x", "x") for i in range(4)]), "at most 3"),
            "huge string": (request(("big", "x" * 5000, "x")), "longer than 1000 characters"),
        }
        for name, (req, expected) in cases.items():
            code, details = status_of(req)
            assert code == invalid, name
            assert expected in details, (name, details)
        code, details = status_of(request(("huge", "x" * 2_000_000, "x")))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # over max_message_mb
        assert stub.Score(request(("ok", "4", "4")), timeout=10).scores[0].reward == 1.0


@pytest.mark.timeout(30)
def test_non_utf8_string_is_invalid_argument():
    with serving(ExactMatch()) as server, grpc.insecure_channel(server.address) as channel:
        raw_score = channel.unary_unary("/rpp.v1.RewardService/Score")  # bytes in, bytes out
        # Sample{id: "a", response: b"\xff\xfe"} inside ScoreRequest.samples, hand-encoded.
        sample = b"\x0a\x01a" + b"\x1a\x02\xff\xfe"
        with pytest.raises(grpc.RpcError) as err:
            raw_score(b"\x0a" + bytes([len(sample)]) + sample, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be parsed" in err.value.details()
        ok = reward_stub(channel).Score(request(("ok", "4", "4")), timeout=10)
        assert ok.scores[0].reward == 1.0


def _certificates(directory: Path) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, issuer_name, issuer_key, key, ca: bool, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    files = {}

    def write(name: str, cert, key) -> None:
        files[f"{name}_cert"] = str(directory / f"{name}.crt")
        files[f"{name}_key"] = str(directory / f"{name}.key")
        Path(files[f"{name}_cert"]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        Path(files[f"{name}_key"]).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    write("ca", issue("test-ca", "test-ca", ca_key, ca_key, True), ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", issue("localhost", "test-ca", ca_key, server_key, False, san), server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", issue("trainer", "test-ca", ca_key, client_key, False), client_key)
    return files


def _secure_channel(address: str, certs: dict[str, str], client_cert: bool) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(certs["ca_cert"]).read_bytes(),
        private_key=Path(certs["client_key"]).read_bytes() if client_cert else None,
        certificate_chain=Path(certs["client_cert"]).read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(address, credentials)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_and_mutual_tls(tmp_path, mutual):
    certs = _certificates(tmp_path)
    config = ServerConfig(
        port=0,
        tls_cert=certs["server_cert"],
        tls_key=certs["server_key"],
        tls_client_ca=certs["ca_cert"] if mutual else None,
    )
    with serving(ExactMatch(), config) as server:
        address = f"localhost:{server.port}"
        with _secure_channel(address, certs, client_cert=True) as channel:
            reply = reward_stub(channel).Score(request(("a", "1", "1")), timeout=10)
            assert reply.scores[0].reward == 1.0
        refused = [grpc.insecure_channel(address)]  # plaintext to a TLS server never works
        if mutual:
            refused.append(_secure_channel(address, certs, client_cert=False))
        for channel in refused:
            with channel, pytest.raises(grpc.RpcError) as err:
                reward_stub(channel).Score(request(("a", "1", "1")), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(30)
def test_bearer_token_right_wrong_missing_and_never_logged(monkeypatch, caplog):
    token = "s3cret-token-value-1234"
    monkeypatch.setenv("RPP_TEST_REWARD_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    config = ServerConfig(port=0, token_env="RPP_TEST_REWARD_TOKEN")
    with serving(ExactMatch(), config) as server, grpc.insecure_channel(server.address) as channel:
        stub = reward_stub(channel)
        good = (("authorization", f"Bearer {token}"),)
        assert stub.Score(request(("a", "1", "1")), metadata=good, timeout=10).scores[0].reward == 1
        for metadata in [(("authorization", "Bearer wrong"),), (("authorization", token),), ()]:
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(request(("a", "1", "1")), metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Orchestrators probe health without the secret.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "UNAUTHENTICATED" in caplog.text or "denied" in caplog.text  # the log did record
    assert token not in caplog.text
