"""One gRPC server runner for every rpp-lightning service (reward and generation servers).

A servicer only implements its RPCs; this module gives every server the same operational
behaviour: loopback bind by default, the standard grpc.health.v1 service, server reflection, a
concurrency limit, a max message size, optional TLS / mutual TLS, an optional bearer token checked
in constant time, clean statuses for unparsable requests and unexpected exceptions, a log line per
call, and a graceful drain on SIGTERM. This module imports grpc and the standard library only:
a math-verifier server runs it without torch.

    server = GrpcServer(ServerConfig(port=0), [ServiceSpec(servicer, add_fn, "rpp.v1.X")])
    server.start()          # binds, returns the port (useful with port 0)
    server.serve_until_signal()
"""

from __future__ import annotations

import hmac
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rpp_lightning.rpc.server_config import ServerConfig

log = logging.getLogger("rpp.server")

_HEALTH_PREFIX = "/grpc.health.v1.Health/"
SERVER_TIME_KEY = "rpp-server-ms"
"""Trailing metadata of every successful unary-response call: milliseconds spent in the server."""


def server_seconds(call: grpc.Call) -> float:
    """Seconds the server spent on a finished call (0.0 if it did not say)."""
    for key, value in call.trailing_metadata() or ():
        if key == SERVER_TIME_KEY:
            return float(value) / 1000
    return 0.0


PARENT_PID_ENV = "RPP_DIE_WITH_PARENT"
"""Set by `local_servers.ChildServer` to its pid: the server asks to die with that process."""


def die_with_parent_if_asked() -> None:
    """Called first by every server CLI. Started by a ChildServer, the server asks the kernel
    (Linux PR_SET_PDEATHSIG) for SIGTERM when the parent dies, even by SIGKILL.

    Here rather than in a `preexec_fn`: a preexec_fn makes Python fork the parent, whose gRPC
    threads and fork handlers then run in the child before exec (seen failing with epoll
    errors); without one, the child is spawned clean."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


class StatusError(Exception):
    """Raised by servicer logic to end a call with a specific gRPC status and message.

    Servicer code raises this instead of touching the context, which keeps it testable without
    gRPC; the runner turns it into `context.abort(code, message)`.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(message: str) -> StatusError:
    """Shorthand for the most common servicer error."""
    return StatusError(grpc.StatusCode.INVALID_ARGUMENT, message)


MAX_STATUS_MESSAGE_BYTES = 1000
"""Longest status message a server sends. gRPC carries it in a header, and a client refuses a
header block over its limit (8 KiB by default) with RESOURCE_EXHAUSTED, hiding the real status:
a message must stay far below that, whatever the client sent."""
QUOTE_CHARS = 40
"""Most characters of a client-chosen string (an id, a tensor name, a path) a message quotes."""


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`value` as an ASCII repr cut to about `limit` characters, for error messages: they name
    what the client sent without echoing megabytes of it back."""
    text = str(value)
    if len(text) <= limit:
        return ascii(text)
    return f"{text[:limit]!a}... ({len(text)} characters)"


def quote_list(values: Sequence[object], most: int = 5) -> str:
    """The first `most` items of `values`, each quoted, then how many more there were."""
    shown = ", ".join(quote(v) if isinstance(v, str) else str(v) for v in values[:most])
    more = len(values) - most
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def bounded(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """`message` cut to at most `limit` UTF-8 bytes, saying so when cut."""
    data = message.encode()
    if len(data) <= limit:
        return message
    keep = limit - 40  # room for the note below
    return data[:keep].decode(errors="ignore") + f" ... [{len(data) - keep} bytes cut]"


def idle_limited(messages: Iterator[Any], idle_s: float) -> Iterator[Any]:
    """The messages of a client stream, ending in DEADLINE_EXCEEDED (StatusError) when none
    arrives for `idle_s` seconds.

    gRPC's request iterator blocks until the next message with no limit of its own, and a
    stalled sender with no deadline would hold the handler (and what it buffered) forever. So a
    helper thread reads the stream, one message ahead at most, and the handler waits on it with
    a timeout. Once the handler has returned, the call ends and the helper's read returns.
    """
    box: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    end = object()

    def hand_over(item: tuple[bool, Any]) -> None:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read() -> None:
        try:
            for message in messages:
                hand_over((True, message))
                if stop.is_set():
                    return
            hand_over((True, end))
        except BaseException as exc:  # raised again on the handler's thread
            hand_over((False, exc))

    threading.Thread(target=read, name="stream-reader", daemon=True).start()
    try:
        while True:
            try:
                ok, item = box.get(timeout=idle_s)
            except queue.Empty:
                raise StatusError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no stream message for {idle_s:g}s: the stream was dropped",
                ) from None
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()


@dataclass
class ServiceSpec:
    """A servicer and how to register it, as the generated `add_XServicer_to_server` does."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.Server], None]
    name: str
    """Full service name, e.g. "rpp.v1.RewardService" (for health and reflection)."""


class _Undecodable:
    """Stands in for a request message that failed to parse (e.g. invalid UTF-8 in a string)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # gRPC answers a deserializer exception with INTERNAL "Exception deserializing request!",
    # which blames the server for the client's bad bytes; we want INVALID_ARGUMENT that says why.
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf raises DecodeError, but be broad: it is input
            return _Undecodable(exc)

    return parse


def _check_parsed(message: Any) -> Any:
    if isinstance(message, _Undecodable):
        raise invalid_argument(f"request could not be parsed: {message.error}")
    return message


def _parsed_stream(messages: Iterator[Any]) -> Iterator[Any]:
    for message in messages:
        yield _check_parsed(message)


def _was_aborted(context: grpc.ServicerContext) -> bool:
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


class _CallPolicy(grpc.ServerInterceptor):
    """Bearer-token auth, parse errors, exception-to-status mapping and a log line per call."""

    def __init__(self, token: str | None) -> None:
        self._token = f"Bearer {token}".encode() if token else None

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        if self._token is None or details.method.startswith(_HEALTH_PREFIX):
            return True  # health stays open so orchestrators can probe without the secret
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        # compare_digest: the time taken must not reveal how much of the token matched
        return hmac.compare_digest(str(sent).encode(), self._token)

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        authorized = self._authorized(details)
        if handler.request_streaming or handler.response_streaming:
            if handler.response_streaming:  # health Watch, reflection: pass through after auth
                return _rebuild(handler, _guard_streaming(handler, method, authorized))
            return _rebuild(handler, _guard_unary_response(handler, method, authorized, True))
        return _rebuild(handler, _guard_unary_response(handler, method, authorized, False))


def _deny(context: grpc.ServicerContext, method: str) -> None:
    log.warning("%s denied: missing or invalid bearer token", method)
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


def _guard_unary_response(handler, method: str, authorized: bool, request_streaming: bool):
    inner = handler.stream_unary if request_streaming else handler.unary_unary

    def behaviour(request, context: grpc.ServicerContext):
        if not authorized:
            _deny(context, method)
        start = time.perf_counter()
        size = ""
        try:
            if request_streaming:
                request = _parsed_stream(request)
            else:
                request = _check_parsed(request)
                size = f" request_bytes={request.ByteSize()}"
            response = inner(request, context)
            # Server-Timing, gRPC style: clients subtract it from their own wall time to see
            # what transport and serialisation cost (benchmarks/step_breakdown.py does).
            server_ms = (time.perf_counter() - start) * 1000
            context.set_trailing_metadata(((SERVER_TIME_KEY, f"{server_ms:.3f}"),))
        except StatusError as exc:
            context.abort(exc.code, bounded(exc.message))
        except Exception as exc:
            if _was_aborted(context):
                raise
            log.exception("%s failed", method)
            context.abort(grpc.StatusCode.INTERNAL, bounded(f"{type(exc).__name__}: {exc}"))
        finally:
            code = context.code() or grpc.StatusCode.OK
            ms = (time.perf_counter() - start) * 1000
            # health probes arrive every few seconds: keep them out of the INFO log
            level = logging.DEBUG if method.startswith(_HEALTH_PREFIX) else logging.INFO
            log.log(level, "%s status=%s latency_ms=%.1f%s", method, code.name, ms, size)
        return response

    return behaviour


def _guard_streaming(handler, method: str, authorized: bool):
    inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

    def behaviour(request, context: grpc.ServicerContext):
        if not authorized:
            _deny(context, method)
        if handler.request_streaming:
            request = _parsed_stream(request)
        else:
            request = _check_parsed(request)
        yield from inner(request, context)

    return behaviour


def _rebuild(handler, behaviour):
    """A handler like `handler` but running `behaviour` and parsing requests safely."""
    deserializer = handler.request_deserializer and _safe_deserializer(handler.request_deserializer)
    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return kind(
        behaviour,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


class GrpcServer:
    """A started-or-not gRPC server hosting `services` with the operational policy above."""

    def __init__(self, config: ServerConfig, services: Sequence[ServiceSpec]) -> None:
        config.validate()
        self.config = config
        self.services = list(services)
        self.port: int | None = None
        self._health = health.HealthServicer(experimental_non_blocking=True)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers),
            interceptors=[_CallPolicy(config.read_token())],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),  # two servers must never share a port by accident
            ],
        )
        for spec in self.services:
            spec.add_to_server(spec.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [s.name for s in self.services]
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self._server,
        )
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.port}"

    def _credentials(self) -> grpc.ServerCredentials | None:
        cfg = self.config
        if not cfg.tls_cert:
            return None
        key_pair = (Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())
        client_ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [key_pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def start(self) -> int:
        """Bind and start serving; return the bound port."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        target = f"{host}:{self.config.port}"
        credentials = self._credentials()
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(target)
            else:
                self.port = self._server.add_secure_port(target, credentials)
        except RuntimeError as exc:  # grpc raises RuntimeError when the bind fails
            raise OSError(f"could not bind {target}: {exc}") from exc
        self._server.start()
        for name in ["", *(s.name for s in self.services)]:
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        tls = "mutual TLS" if self.config.tls_client_ca else ("TLS" if credentials else "plaintext")
        auth = "bearer token" if self.config.read_token() else "no auth"
        names = ", ".join(s.name for s in self.services)
        log.info("serving %s on %s (%s, %s)", names, self.address, tls, auth)
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight calls finish within grace."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._health.enter_graceful_shutdown()
        grace = self.config.grace_s if grace is None else grace
        log.info("draining (grace %.1fs)", grace)
        self._server.stop(grace).wait()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; True if it did within `timeout`."""
        return self._server.wait_for_termination(timeout)

    def serve_until_signal(self) -> None:
        """Start (if needed), print the address, and serve until SIGTERM or SIGINT, then drain.

        The line `listening on HOST:PORT` goes to stdout so scripts using --port 0 can read it.
        """
        if self.port is None:
            self.start()
        print(f"listening on {self.address}", flush=True)
        stop_requested = threading.Event()

        def on_signal(signum, _frame):
            log.info("received %s", signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not stop_requested.wait(0.5):
            pass
        self.stop()
        # The drain is over, yet a handler whose client went away (its call was cancelled) may
        # still be computing, and Python waits for handler threads at exit. Don't outlive the
        # drain by more than this: an orchestrator that sent SIGTERM expects the process gone.
        watchdog = threading.Timer(EXIT_AFTER_DRAIN_S, _exit_with_handlers_running)
        watchdog.daemon = True
        watchdog.start()


EXIT_AFTER_DRAIN_S = 10.0
"""After the SIGTERM drain, a server still held up by running handlers exits anyway (code 1)."""


def _exit_with_handlers_running() -> None:
    log.error("handlers still running %.0fs after the drain; exiting anyway", EXIT_AFTER_DRAIN_S)
    logging.shutdown()
    os._exit(1)


def configure_logging(level: str = "INFO") -> None:
    """One log format for every server CLI."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
