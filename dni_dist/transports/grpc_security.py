"""Who may talk to a stage's gRPC server: TLS for the wire, a shared token for the caller.

On loopback neither is needed (only this machine can connect). Anywhere else both are
required: the server presents a certificate (PEM cert + key), clients verify it against a
CA bundle (``dist.grpc_tls_ca``; unset = the system's roots), and every call carries
``authorization: Bearer <token>``, the token read from an environment variable (never the
config, which summary.json records). The server compares tokens in constant time and
answers UNAUTHENTICATED before any frame is read.

Certificate names: a client checks the server's certificate against the host it dials,
which is the advertised address (the node IP when binding 0.0.0.0). So the certificate's
subjectAltName must list the IPs (or DNS names) peers dial; no name override is used, so
a certificate for some other host of the same CA is not accepted.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from dni_dist.errors import ConfigError
from dni_dist.transports.addresses import is_loopback

TOKEN_HEADER = "authorization"
TOKEN_SCHEME = "Bearer "


def _read(key: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}={path!r} cannot be read ({exc.strerror}); give a PEM file") from None


@dataclass(frozen=True, repr=False)  # repr=False: the token and key must not end up in logs
class GrpcSecurity:
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    ca_pem: bytes | None = None
    token: str | None = None

    @classmethod
    def from_settings(
        cls,
        cert: str | None,
        key: str | None,
        ca: str | None,
        token_env: str,
        environ: Mapping[str, str] = os.environ,
    ) -> GrpcSecurity:
        """Read the PEM files and the token (from ``environ[token_env]``, if set)."""
        return cls(
            _read("dist.grpc_tls_cert", cert),
            _read("dist.grpc_tls_key", key),
            _read("dist.grpc_tls_ca", ca),
            environ.get(token_env) or None,
        )

    @property
    def tls(self) -> bool:
        return self.cert_pem is not None and self.key_pem is not None

    def require_for(self, bind_host: str, token_env: str = "DNI_GRPC_TOKEN") -> None:
        """ConfigError unless listening on ``bind_host`` is safe with these settings."""
        if is_loopback(bind_host):
            return
        missing = []
        if not self.tls:
            missing.append("TLS (dist.grpc_tls_cert and dist.grpc_tls_key)")
        if not self.token:
            missing.append(f"a token in the environment variable {token_env}")
        if missing:
            raise ConfigError(f"gRPC bind {bind_host} is not loopback and needs {' and '.join(missing)}")

    # ------------------------------------------------------------- server side
    def add_port(self, server: grpc.Server, address: str) -> int:
        if not self.tls:
            return server.add_insecure_port(address)
        assert self.cert_pem is not None and self.key_pem is not None
        return server.add_secure_port(address, grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)]))

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenCheck(self.token)] if self.token else []

    # ------------------------------------------------------------- client side
    def channel(self, address: str, options: list[tuple[str, object]]) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=self.ca_pem), options)

    def metadata(self) -> list[tuple[str, str]]:
        return [(TOKEN_HEADER, TOKEN_SCHEME + self.token)] if self.token else []


def _refuse(context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that refuses every call."""

    def refuse(_request, context: grpc.ServicerContext):
        _refuse(context)

    kinds: dict[tuple[bool, bool], Callable] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenCheck(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call whose metadata lacks the shared token."""

    def __init__(self, token: str) -> None:
        self._expected = (TOKEN_SCHEME + token).encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        sent = [v for k, v in handler_call_details.invocation_metadata or () if k == TOKEN_HEADER]
        given = sent[0].encode() if len(sent) == 1 and isinstance(sent[0], str) else b""
        if hmac.compare_digest(given, self._expected):
            return handler
        return _refusing_handler(handler)
