from __future__ import annotations

import base64
import hashlib
import random
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vxnet.errors import UsageError
from vxnet.manager.pki import (
    CertificateRefused,
    NodeIdentity,
    RootCA,
    ca_digest,
    client_ssl_context,
    create_root_ca,
    identity_from_der,
    make_csr,
    new_node_key,
    renewal_time,
    server_ssl_context,
    sign_node_cert,
    verify_node_cert,
)
from vxnet.manager.tokens import make_token, verify_ca

# OpenSSL checks validity against the real clock during handshakes, so the fixtures are issued
# "now"; every other check passes an explicit time relative to it.
NOW = datetime.now(UTC).replace(microsecond=0)
CLUSTER = "cluster0123456789abcdefgh"


@dataclass(frozen=True)
class Node:
    key_pem: bytes
    cert_pem: bytes


def issue(ca: RootCA, node_id: str, role: str = "swarm-worker", **kw: object) -> Node:
    key = new_node_key()
    cert = sign_node_cert(ca, make_csr(key), node_id, role, CLUSTER, NOW, **kw)  # type: ignore[arg-type]
    return Node(key, cert)


@pytest.fixture(scope="module")
def ca() -> RootCA:
    return create_root_ca(NOW)


@pytest.fixture(scope="module")
def other_ca() -> RootCA:
    return create_root_ca(NOW)


@pytest.fixture(scope="module")
def manager(ca: RootCA) -> Node:
    return issue(ca, "managernode0001", "swarm-manager", san_ips=["127.0.0.1", "::1"])


@pytest.fixture(scope="module")
def worker(ca: RootCA) -> Node:
    return issue(ca, "workernode00001")


# ---------------------------------------------------------------------------- certificates


def test_root_ca(ca: RootCA) -> None:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.subject.rfc4514_string() == "CN=swarm-ca" == cert.issuer.rfc4514_string()
    cert.verify_directly_issued_by(cert)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert cert.not_valid_after_utc == NOW + timedelta(days=7300)
    assert ca.key_pem is not None and ca.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert "key_pem" not in repr(ca)


def test_node_key_and_csr() -> None:
    key_pem = new_node_key()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS #8, unencrypted
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(make_csr(key_pem))
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    with pytest.raises(UsageError):
        make_csr(b"garbage")


def test_node_certificate_fields(ca: RootCA, manager: Node) -> None:
    cert = x509.load_pem_x509_certificate(manager.cert_pem)
    name = {a.oid: a.value for a in cert.subject}
    assert name == {
        NameOID.COMMON_NAME: "managernode0001",
        NameOID.ORGANIZATIONAL_UNIT_NAME: "swarm-manager",
        NameOID.ORGANIZATION_NAME: CLUSTER,
    }
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["managernode0001", "swarm-manager"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert cert.not_valid_after_utc == NOW + timedelta(days=90)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    key = serialization.load_pem_private_key(manager.key_pem, None)
    assert cert.public_key() == key.public_key()


def test_verify_node_cert(ca: RootCA, worker: Node) -> None:
    identity = verify_node_cert(ca.cert_pem, worker.cert_pem, NOW, cluster_id=CLUSTER)
    assert identity == NodeIdentity(
        "workernode00001",
        "swarm-worker",
        CLUSTER,
        NOW - timedelta(minutes=1),
        NOW + timedelta(days=90),
    )
    der = x509.load_pem_x509_certificate(worker.cert_pem).public_bytes(serialization.Encoding.DER)
    assert identity_from_der(ca.cert_pem, der, NOW) == identity


def test_expired_and_not_yet_valid(ca: RootCA, worker: Node) -> None:
    end = NOW + timedelta(days=90)
    verify_node_cert(ca.cert_pem, worker.cert_pem, end)
    with pytest.raises(CertificateRefused, match="certificate expired"):
        verify_node_cert(ca.cert_pem, worker.cert_pem, end + timedelta(seconds=1))
    with pytest.raises(CertificateRefused, match="not valid before"):
        verify_node_cert(ca.cert_pem, worker.cert_pem, NOW - timedelta(minutes=2))


def test_other_ca_wrong_cluster_and_wrong_role(ca: RootCA, other_ca: RootCA, worker: Node) -> None:
    with pytest.raises(CertificateRefused, match="not signed by this swarm's root CA"):
        verify_node_cert(other_ca.cert_pem, worker.cert_pem, NOW)
    with pytest.raises(CertificateRefused, match="belongs to cluster"):
        verify_node_cert(ca.cert_pem, worker.cert_pem, NOW, cluster_id="another")
    # The root CA is signed by itself but names no node: it has no OU.
    with pytest.raises(CertificateRefused, match="exactly one OU"):
        verify_node_cert(ca.cert_pem, ca.cert_pem, NOW)


def test_certificate_with_foreign_role_is_refused(ca: RootCA) -> None:
    assert ca.key_pem is not None
    ca_key = serialization.load_pem_private_key(ca.key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "node"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "swarm-ca"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CLUSTER),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    with pytest.raises(CertificateRefused, match="role 'swarm-ca'"):
        identity_from_der(ca.cert_pem, cert.public_bytes(serialization.Encoding.DER), NOW)


@pytest.mark.parametrize("data", [b"", b"-----BEGIN CERTIFICATE-----\nAAAA\n", b"\x00" * 40])
def test_malformed_certificates_are_refused(ca: RootCA, data: bytes) -> None:
    with pytest.raises(CertificateRefused, match="malformed"):
        verify_node_cert(ca.cert_pem, data, NOW)
    with pytest.raises(CertificateRefused, match="malformed"):
        identity_from_der(ca.cert_pem, data, NOW)
    with pytest.raises(CertificateRefused, match="malformed root CA"):
        verify_node_cert(data, ca.cert_pem, NOW)


def _tampered_csr(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    body = base64.encodebytes(bytes(der))
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


def test_csr_checks(ca: RootCA) -> None:
    csr = make_csr(new_node_key())
    with pytest.raises(CertificateRefused, match="bad CSR signature"):
        sign_node_cert(ca, _tampered_csr(csr), "n1", "swarm-worker", CLUSTER, NOW)
    with pytest.raises(CertificateRefused, match="malformed CSR"):
        sign_node_cert(ca, b"not a csr", "n1", "swarm-worker", CLUSTER, NOW)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    rsa_pem = rsa_csr.sign(rsa_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CertificateRefused, match="unsupported CSR key"):
        sign_node_cert(ca, rsa_pem, "n1", "swarm-worker", CLUSTER, NOW)


def test_the_csr_subject_is_ignored(ca: RootCA) -> None:
    key_pem = new_node_key()
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    evil = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "swarm-manager")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(evil).sign(key, hashes.SHA256())
    cert = sign_node_cert(
        ca, csr.public_bytes(serialization.Encoding.PEM), "n1", "swarm-worker", CLUSTER, NOW
    )
    assert verify_node_cert(ca.cert_pem, cert, NOW).role == "swarm-worker"


def test_sign_usage_errors(ca: RootCA) -> None:
    csr = make_csr(new_node_key())
    with pytest.raises(UsageError, match="no private key"):
        sign_node_cert(RootCA(ca.cert_pem), csr, "n1", "swarm-worker", CLUSTER, NOW)
    with pytest.raises(UsageError, match="role"):
        sign_node_cert(ca, csr, "n1", "swarm-ca", CLUSTER, NOW)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="empty"):
        sign_node_cert(ca, csr, "", "swarm-worker", CLUSTER, NOW)
    with pytest.raises(UsageError, match="timezone-aware"):
        sign_node_cert(ca, csr, "n1", "swarm-worker", CLUSTER, datetime(2024, 1, 1))
    with pytest.raises(UsageError, match="not an IP address"):
        sign_node_cert(ca, csr, "n1", "swarm-worker", CLUSTER, NOW, san_ips=["host"])
    with pytest.raises(UsageError, match="positive"):
        sign_node_cert(ca, csr, "n1", "swarm-worker", CLUSTER, NOW, lifetime=timedelta(0))


def test_renewal_time_between_50_and_80_percent(ca: RootCA) -> None:
    node = issue(ca, "n1", lifetime=timedelta(hours=10))
    start = NOW - timedelta(minutes=1)
    life = timedelta(hours=10, minutes=1)
    times = [renewal_time(node.cert_pem, random.Random(seed)) for seed in range(300)]
    assert all(start + life * 0.5 <= t <= start + life * 0.8 for t in times)
    assert min(times) < start + life * 0.52 and max(times) > start + life * 0.78
    assert renewal_time(node.cert_pem, random.Random(1)) == times[1]


def test_ca_digest_is_the_token_digest(ca: RootCA) -> None:
    assert ca_digest(ca.cert_pem) == hashlib.sha256(ca.cert_pem).digest()
    verify_ca(ca.cert_pem, make_token(ca.cert_pem, bytes(16)))


# ---------------------------------------------------------------------------- TLS


def memory_handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A real TLS handshake through memory BIOs, then one application record each way."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out)
    pending = [client, server]
    for _ in range(10):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert not pending
    client.write(b"ping")
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"  # TLS 1.3 verifies the client certificate only here
    server.write(b"pong")
    c_in.write(s_out.read())
    assert client.read(4) == b"pong"
    return server, client


def test_mutual_tls_in_memory(ca: RootCA, manager: Node, worker: Node) -> None:
    server_ctx = server_ssl_context(ca.cert_pem, manager.cert_pem, manager.key_pem, True)
    client_ctx = client_ssl_context(ca.cert_pem, worker.cert_pem, worker.key_pem)
    server, client = memory_handshake(server_ctx, client_ctx)
    assert client.version() in ("TLSv1.2", "TLSv1.3")
    peer = server.getpeercert(binary_form=True)
    assert peer is not None
    assert identity_from_der(ca.cert_pem, peer, NOW, CLUSTER).node_id == "workernode00001"
    seen_by_client = client.getpeercert(binary_form=True)
    assert seen_by_client is not None
    assert identity_from_der(ca.cert_pem, seen_by_client, NOW).role == "swarm-manager"


def test_client_cert_from_another_ca_is_refused(
    ca: RootCA, other_ca: RootCA, manager: Node
) -> None:
    stranger = issue(other_ca, "stranger")
    server_ctx = server_ssl_context(ca.cert_pem, manager.cert_pem, manager.key_pem, False)
    client_ctx = client_ssl_context(ca.cert_pem, stranger.cert_pem, stranger.key_pem)
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        memory_handshake(server_ctx, client_ctx)


def test_server_cert_from_another_ca_is_refused(ca: RootCA, other_ca: RootCA, worker: Node) -> None:
    impostor = issue(other_ca, "impostor", "swarm-manager")
    server_ctx = server_ssl_context(other_ca.cert_pem, impostor.cert_pem, impostor.key_pem, True)
    client_ctx = client_ssl_context(ca.cert_pem, worker.cert_pem, worker.key_pem)
    with pytest.raises(ssl.SSLCertVerificationError):
        memory_handshake(server_ctx, client_ctx)


def test_missing_client_cert_refused_when_required(ca: RootCA, manager: Node) -> None:
    server_ctx = server_ssl_context(ca.cert_pem, manager.cert_pem, manager.key_pem, True)
    with pytest.raises(ssl.SSLError):
        memory_handshake(server_ctx, client_ssl_context(ca.cert_pem))


def test_joining_node_fetches_the_ca_unverified(ca: RootCA, manager: Node) -> None:
    server_ctx = server_ssl_context(ca.cert_pem, manager.cert_pem, manager.key_pem, False)
    server, client = memory_handshake(server_ctx, client_ssl_context(None))
    assert server.getpeercert(binary_form=True) is None  # the joiner has no certificate yet
    # The joiner checks the CA the manager sends against its token, then the manager's cert.
    verify_ca(ca.cert_pem, make_token(ca.cert_pem, bytes(16)))
    der = client.getpeercert(binary_form=True)
    assert der is not None
    assert identity_from_der(ca.cert_pem, der, NOW).role == "swarm-manager"


@dataclass
class Outcome:
    peer_der: bytes | None = None
    error: Exception | None = None


def socket_exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> list[Outcome]:
    """A handshake over a real socketpair: the server side in a thread."""
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(10)
    client_sock.settimeout(10)
    outcomes = [Outcome(), Outcome()]

    def run(ctx: ssl.SSLContext, sock: socket.socket, server: bool, out: Outcome) -> None:
        try:
            with ctx.wrap_socket(sock, server_side=server) as tls:
                if server:
                    tls.sendall(tls.recv(4))
                else:
                    tls.sendall(b"ping")
                    if tls.recv(4) != b"ping":
                        raise ConnectionError("no echo")
                out.peer_der = tls.getpeercert(binary_form=True)
        except (OSError, ConnectionError) as exc:
            out.error = exc
        finally:
            sock.close()

    thread = threading.Thread(target=run, args=(server_ctx, server_sock, True, outcomes[0]))
    thread.start()
    run(client_ctx, client_sock, False, outcomes[1])
    thread.join(10)
    assert not thread.is_alive()
    return outcomes


def test_mutual_tls_over_a_socketpair(ca: RootCA, manager: Node, worker: Node) -> None:
    server_ctx = server_ssl_context(ca.cert_pem, manager.cert_pem, manager.key_pem, True)
    client_ctx = client_ssl_context(ca.cert_pem, worker.cert_pem, worker.key_pem)
    server, client = socket_exchange(server_ctx, client_ctx)
    assert server.error is None and client.error is None
    assert server.peer_der is not None and client.peer_der is not None
    assert identity_from_der(ca.cert_pem, server.peer_der, NOW).node_id == "workernode00001"
    assert identity_from_der(ca.cert_pem, client.peer_der, NOW).node_id == "managernode0001"


def test_foreign_client_refused_over_a_socketpair(
    ca: RootCA, other_ca: RootCA, manager: Node
) -> None:
    stranger = issue(other_ca, "stranger")
    server_ctx = server_ssl_context(ca.cert_pem, manager.cert_pem, manager.key_pem, True)
    client_ctx = client_ssl_context(ca.cert_pem, stranger.cert_pem, stranger.key_pem)
    server, _client = socket_exchange(server_ctx, client_ctx)
    assert isinstance(server.error, ssl.SSLError)
    assert "certificate verify failed" in str(server.error)
    assert server.peer_der is None


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path


def test_context_setup_leaves_no_key_files(ca: RootCA, worker: Node, private_tmp: Path) -> None:
    ctx = server_ssl_context(ca.cert_pem, worker.cert_pem, worker.key_pem, True)
    client_ssl_context(ca.cert_pem, worker.cert_pem, worker.key_pem)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert list(private_tmp.iterdir()) == []


def test_context_usage_errors(ca: RootCA, worker: Node, manager: Node) -> None:
    with pytest.raises(UsageError, match="both"):
        client_ssl_context(ca.cert_pem, worker.cert_pem)
    with pytest.raises(UsageError, match="certificate and key"):
        client_ssl_context(ca.cert_pem, worker.cert_pem, manager.key_pem)
    with pytest.raises(UsageError, match="root CA"):
        server_ssl_context(b"junk", worker.cert_pem, worker.key_pem, True)
    ctx = client_ssl_context(None)
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_NONE, False)
