"""gRPC off loopback: TLS on the wire and a shared token on every call, or no start at all."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dni_dist.config import load_config
from dni_dist.core.messages import Kind, Message
from dni_dist.errors import ConfigError
from dni_dist.transports.base import Stream
from dni_dist.transports.grpc_security import GrpcSecurity
from dni_dist.transports.grpc_transport import GrpcTransport
from dni_dist.wire import dni_pb2 as pb
from dni_dist.wire import dni_pb2_grpc as rpc
from dni_dist.wire.codec import handshake, message_frames

UP = Stream(0, 1, True, (8, 5), (8,))
DOWN = Stream(1, 0, False, (8, 5))
TOKEN = "s3cret-token-for-tests"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and localhost (its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dni-stage")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "stage.pem", directory / "stage.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def security(pem: tuple[Path, Path]) -> GrpcSecurity:
    cert, key = pem
    return GrpcSecurity.from_settings(str(cert), str(key), str(cert), "DNI_TEST_TOKEN", {"DNI_TEST_TOKEN": TOKEN})


@pytest.fixture(scope="module")
def tls_stage(security: GrpcSecurity):
    stage = GrpcTransport(1, [UP], [], "tls-run", security=security)
    stage.start()
    yield stage
    stage.close()


def _hello_and_message(step: int) -> list[pb.Frame]:
    msg = Message(Kind.ACTIVATION, step, 0, 1, torch.randn(8, 5), torch.arange(8))
    return [handshake(UP, "tls-run"), *message_frames(msg)]


def _secure_push(address: str, ca: bytes, metadata: list[tuple[str, str]], step: int) -> pb.Ack:
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(address, creds) as channel:
        return rpc.StageStub(channel).Push(iter(_hello_and_message(step)), metadata=metadata, timeout=30)


def test_messages_travel_intact_over_tls_with_the_token(security: GrpcSecurity) -> None:
    # Bound to every interface (as on a cluster), dialled on 127.0.0.1, which the certificate names.
    b = GrpcTransport(1, [UP], [DOWN], "tls-run", bind_host="0.0.0.0", advertise_host="127.0.0.1", security=security)
    a = GrpcTransport(0, [DOWN], [UP], "tls-run", security=security)
    try:
        a.connect({1: b.address})
        a.start()
        b.start()
        b.expect(0, 1)
        x = torch.randn(8, 5)
        a.send(Message(Kind.ACTIVATION, 0, 0, 1, x, torch.arange(8)))
        got = b.recv(timeout=30)
        assert got.step == 0 and torch.equal(got.tensor, x) and got.labels.tolist() == list(range(8))
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer wrong")], [("authorization", TOKEN)]])
def test_calls_without_the_right_token_are_unauthenticated(tls_stage, security, metadata) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _secure_push(tls_stage.address, security.ca_pem, metadata, step=0)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # ... and nothing was delivered: the right token still gets step 0 through.
    ack = _secure_push(tls_stage.address, security.ca_pem, security.metadata(), step=tls_stage.guards[0]._last_up + 1)
    assert ack.ok
    tls_stage.expect(0, 1)
    assert tls_stage.recv(timeout=30).kind is Kind.ACTIVATION


def test_a_plaintext_client_cannot_talk_to_a_tls_stage(tls_stage, security) -> None:
    with grpc.insecure_channel(tls_stage.address) as channel, pytest.raises(grpc.RpcError) as refused:
        rpc.StageStub(channel).Push(iter(_hello_and_message(99)), metadata=security.metadata(), timeout=5)
    assert refused.value.code() is not grpc.StatusCode.OK


def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_stage, security, tmp_path) -> None:
    other_ca, _ = _self_signed(tmp_path)
    with pytest.raises(grpc.RpcError) as refused:
        _secure_push(tls_stage.address, other_ca.read_bytes(), security.metadata(), step=99)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_binding_off_loopback_without_tls_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"dist.grpc_bind=0.0.0.0 is not loopback: .*needs TLS"):
        load_config(overrides=["transport=grpc", "dist.grpc_bind=0.0.0.0"])
    with pytest.raises(ConfigError, match=r"give both or neither"):
        load_config(overrides=["transport=grpc", "dist.grpc_tls_cert=/x.pem"])
    assert load_config(overrides=["transport=gloo", "dist.grpc_bind=0.0.0.0"])  # gRPC settings unused there


def test_a_stage_off_loopback_needs_the_token_in_its_environment(pem) -> None:
    cert, key = pem
    no_token = GrpcSecurity.from_settings(str(cert), str(key), str(cert), "DNI_TEST_TOKEN", {})
    with pytest.raises(ConfigError, match="needs a token in the environment variable DNI_TEST_TOKEN"):
        GrpcTransport(1, [UP], [], "run", bind_host="0.0.0.0", security=no_token, token_env="DNI_TEST_TOKEN")
    with pytest.raises(ConfigError, match=r"needs TLS .* and a token"):
        GrpcTransport(1, [UP], [], "run", bind_host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"dist\.grpc_tls_key=./no/such\.key. cannot be read"):
        GrpcSecurity.from_settings(str(cert), "/no/such.key", None, "DNI_TEST_TOKEN", {})


def test_the_token_stays_out_of_reprs(security: GrpcSecurity) -> None:
    assert TOKEN not in repr(security) and TOKEN not in str(load_config(overrides=["transport=grpc"]))
