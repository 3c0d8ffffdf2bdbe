"""The swarm's certificate authority, as swarmkit's ``ca`` package runs it, sans-IO.

* The root CA is a self-signed ECDSA P-256 certificate, CN ``swarm-ca``, valid 20 years.
* Node certificates (90 days by default) name the node: CN = node id, OU = role
  (``swarm-manager`` | ``swarm-worker``), O = cluster id; SAN DNS names: the node id and the
  role.  Only the CSR's public key is trusted; everything else comes from the caller.
* A node renews at a random point between 50 % and 80 % of its certificate's lifetime.

Time is an argument (timezone-aware ``datetime``).  Key pairs and serial numbers come from the
operating system's CSPRNG through ``cryptography``: key material must never be reproducible.
The :mod:`ssl` contexts identify peers by certificate, not host name: callers pass
``getpeercert(binary_form=True)`` to :func:`identity_from_der`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import random
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vxnet.errors import UsageError, VxnetError

ROOT_CN = "swarm-ca"
MANAGER_ROLE = "swarm-manager"
WORKER_ROLE = "swarm-worker"
ROLES = (WORKER_ROLE, MANAGER_ROLE)
Role = Literal["swarm-worker", "swarm-manager"]
ROOT_CA_LIFETIME = timedelta(days=7300)  # swarmkit: 630720000 s
DEFAULT_NODE_CERT_LIFETIME = timedelta(days=90)
CERT_BACKDATE = timedelta(minutes=1)
RENEW_LOW, RENEW_HIGH = 0.5, 0.8


class CertificateRefused(VxnetError):
    """A certificate or CSR that this swarm does not accept; the message says why."""


@dataclass(frozen=True, slots=True)
class RootCA:
    """The root CA certificate, and its key on managers (``None`` on workers)."""

    cert_pem: bytes
    key_pem: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who a verified node certificate names."""

    node_id: str
    role: str
    cluster_id: str
    not_before: datetime
    not_after: datetime


def create_root_ca(now: datetime) -> RootCA:
    """A new self-signed root CA valid from one minute before ``now`` for 20 years."""
    _check_aware(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ROOT_CN)])
    public = key.public_key()
    usage = _key_usage("key_cert_sign", "crl_sign")
    cert = (
        _builder(name, name, public, now - CERT_BACKDATE, now + ROOT_CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return RootCA(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def new_node_key() -> bytes:
    """A fresh ECDSA P-256 private key, PEM (PKCS #8, unencrypted)."""
    return _key_pem(ec.generate_private_key(ec.SECP256R1()))


def make_csr(key_pem: bytes) -> bytes:
    """A PEM certificate signing request for ``key_pem``; the CA fills in the subject."""
    key = _load_ec_key(key_pem)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def sign_node_cert(
    ca: RootCA,
    csr_pem: bytes,
    node_id: str,
    role: Role,
    cluster_id: str,
    now: datetime,
    lifetime: timedelta = DEFAULT_NODE_CERT_LIFETIME,
    san_ips: Sequence[str] = (),
) -> bytes:
    """Issue a node certificate for the public key in ``csr_pem`` (PEM out).

    Raises :class:`CertificateRefused` for a malformed CSR, a bad CSR signature or an unsupported
    key, and :class:`UsageError` for bad arguments (no CA key, unknown role, empty ids).
    """
    _check_aware(now)
    _check_subject(node_id, role, cluster_id, lifetime)
    ips = [_ip(text) for text in san_ips]
    if ca.key_pem is None:
        raise UsageError("this root CA has no private key: only a manager can sign certificates")
    ca_cert, ca_key = _load_cert_pem(ca.cert_pem, "root CA"), _load_ec_key(ca.key_pem)
    public = _csr_public_key(csr_pem)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, node_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
        ]
    )
    sans: list[x509.GeneralName] = [x509.DNSName(node_id), x509.DNSName(role)]
    sans += [x509.IPAddress(ip) for ip in ips]
    eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_public = ca_key.public_key()
    cert = (
        _builder(subject, ca_cert.subject, public, now - CERT_BACKDATE, now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage("digital_signature", "key_encipherment"), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def verify_node_cert(
    ca_pem: bytes, cert_pem: bytes, now: datetime, cluster_id: str | None = None
) -> NodeIdentity:
    """Check a PEM node certificate against the root CA and return whom it names."""
    cert = _load_cert_pem(cert_pem, "node certificate")
    return _identity(_load_cert_pem(ca_pem, "root CA"), cert, now, cluster_id)


def identity_from_der(
    ca_pem: bytes, der: bytes, now: datetime, cluster_id: str | None = None
) -> NodeIdentity:
    """:func:`verify_node_cert` for DER, as ``SSLSocket.getpeercert(binary_form=True)`` gives."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CertificateRefused(f"malformed node certificate: {exc}") from None
    return _identity(_load_cert_pem(ca_pem, "root CA"), cert, now, cluster_id)


def renewal_time(cert_pem: bytes, rng: random.Random) -> datetime:
    """When to renew: a uniformly random point between 50 % and 80 % of the lifetime (UTC)."""
    cert = _load_cert_pem(cert_pem, "node certificate")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * rng.uniform(RENEW_LOW, RENEW_HIGH)


def ca_digest(cert_pem: bytes) -> bytes:
    """SHA-256 of the root CA's PEM bytes exactly as given (the join token's digest)."""
    return hashlib.sha256(cert_pem).digest()


def server_ssl_context(
    ca_pem: bytes, cert_pem: bytes, key_pem: bytes, require_client_cert: bool
) -> ssl.SSLContext:
    """TLS 1.2+ server context.  Without ``require_client_cert`` a client certificate is still
    verified when presented (swarmkit's ``VerifyClientCertIfGiven``): joining nodes have none."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(ctx, ca_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    _load_chain(ctx, cert_pem, key_pem)
    return ctx


def client_ssl_context(
    ca_pem: bytes | None, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> ssl.SSLContext:
    """TLS 1.2+ client context; no host name check (the caller checks the peer's identity).

    ``ca_pem=None`` skips verification: only for a joining node's first fetch of the root CA,
    which it then checks against the join token (:func:`vxnet.manager.tokens.verify_ca`).
    """
    if (cert_pem is None) != (key_pem is None):
        raise UsageError("pass both cert_pem and key_pem for a client certificate, or neither")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    if ca_pem is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        _load_ca(ctx, ca_pem)
    if cert_pem is not None and key_pem is not None:
        _load_chain(ctx, cert_pem, key_pem)
    return ctx


def _identity(
    ca: x509.Certificate, cert: x509.Certificate, now: datetime, cluster_id: str | None
) -> NodeIdentity:
    _check_aware(now)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateRefused(f"certificate not signed by this swarm's root CA: {exc}") from None
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        raise CertificateRefused(f"certificate not valid before {start.isoformat()}")
    if now > end:
        raise CertificateRefused(f"certificate expired at {end.isoformat()}")
    node_id = _one_attribute(cert, NameOID.COMMON_NAME, "CN")
    role = _one_attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU")
    org = _one_attribute(cert, NameOID.ORGANIZATION_NAME, "O")
    if role not in ROLES:
        raise CertificateRefused(f"certificate role {role!r} is not one of {ROLES}")
    if cluster_id is not None and org != cluster_id:
        raise CertificateRefused(f"certificate belongs to cluster {org!r}, not {cluster_id!r}")
    return NodeIdentity(node_id, role, org, start, end)


def _one_attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier, label: str) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str) or not values[0].value:
        raise CertificateRefused(f"certificate subject needs exactly one {label}")
    return values[0].value


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


_KEY_USAGE_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _key_usage(*names: str) -> x509.KeyUsage:
    return x509.KeyUsage(**{name: name in names for name in _KEY_USAGE_FIELDS})


def _csr_public_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        valid = csr.is_signature_valid
        public = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise CertificateRefused(f"malformed CSR: {exc}") from None
    if not valid:
        raise CertificateRefused("bad CSR signature")
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in _CURVES:
        raise CertificateRefused("unsupported CSR key: use ECDSA P-256 or P-384")
    return public


_CURVES = frozenset({"secp256r1", "secp384r1"})


def _load_cert_pem(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateRefused(f"malformed {what}: {exc}") from None


def _load_ec_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError("the private key must be ECDSA (P-256)")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise UsageError("pass a timezone-aware datetime, e.g. datetime.now(timezone.utc)")


def _check_subject(node_id: str, role: str, cluster_id: str, lifetime: timedelta) -> None:
    if role not in ROLES:
        raise UsageError(f"role must be one of {ROLES}, not {role!r}")
    if not node_id or not cluster_id:
        raise UsageError("node_id and cluster_id must not be empty")
    if lifetime <= timedelta(0):
        raise UsageError(f"certificate lifetime must be positive, got {lifetime}")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"{text!r} is not an IP address") from None


def _load_ca(ctx: ssl.SSLContext, ca_pem: bytes) -> None:
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"cannot load the root CA into TLS: {exc}") from None


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``ssl`` reads key pairs only from files: write them into a private directory and
    delete it as soon as they are loaded."""
    with tempfile.TemporaryDirectory(prefix="vxnet-tls-") as tmp:
        cert_path = _write_private(tmp, "cert.pem", cert_pem)
        key_path = _write_private(tmp, "key.pem", key_pem)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise UsageError(f"cannot load the certificate and key into TLS: {exc}") from None


def _write_private(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
