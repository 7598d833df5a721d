"""Certificates for mutual TLS between coordinators and nodes.

One federation CA (EC P-256, ``path_len=0``) signs every certificate directly:

- a **node** certificate (server and client auth) carries ``DNS:<node name>`` in its
  subjectAltName, plus any DNS names and IP addresses it is reachable under;
- a **consumer** certificate (client auth only) carries ``DNS:<consumer name>``; its subject
  common name is the identity a node maps to a consumer policy (:func:`peer_common_name`).

A node serves with :func:`server_credentials`, which requires a client certificate signed by
the CA, so a caller without one fails the TLS handshake (``UNAVAILABLE``) before any handler
runs. A coordinator dials with :func:`channel_credentials` and checks the node's certificate
against the CA *and the node name it expects*, not against the address it dials. gRPC Python
does this through a channel option while the target is an IP address or an unrelated host::

    grpc.secure_channel(
        "10.0.0.7:50051",
        pki.channel_credentials(identity),
        options=[("grpc.ssl_target_name_override", "node-eu")],
    )

The override replaces the name matched against the certificate's subjectAltName, which is
why every node certificate must carry ``DNS:<node name>`` (:func:`issue` always adds it).

gRPC Python cannot consult a CRL, so revocation is checked by the node per call: it reads a
revocation file (:func:`read_revocation_file`) and asks :func:`is_revoked` about the peer
certificate (:func:`peer_certificate`). Expired and not-yet-valid peer certificates are
already refused by the handshake; :func:`check_validity` checks one's own certificates.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import ConfigError, InvalidRequestError

__all__ = [
    "Identity",
    "Role",
    "channel_credentials",
    "check_validity",
    "check_node_certificate",
    "check_trust_anchor",
    "common_name",
    "fingerprint",
    "init_ca",
    "is_revoked",
    "issue",
    "peer_certificate",
    "peer_common_name",
    "read_revocation_file",
    "serial_hex",
    "server_credentials",
]

logger = logging.getLogger(__name__)

Role = Literal["node", "consumer"]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NODE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # nodes.config's node.name rule
_HEX_RE = re.compile(r"[0-9a-f]+")
_FINGERPRINT_HEX_CHARS = 64  # SHA-256
_MAX_SERIAL_HEX_CHARS = 40  # RFC 5280 section 4.1.2.2: at most 20 octets
# Backdate new certificates a little so a peer whose clock runs slow still accepts them.
_CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Identity:
    """A party's TLS material as PEM bytes, ready for ``grpc.ssl_*_credentials``.

    Attributes:
        ca_pem: The federation CA certificate(s) this party trusts.
        cert_pem: This party's certificate (chain).
        key_pem: This party's unencrypted private key (kept out of ``repr``).
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("ca_pem", "cert_pem", "key_pem"):
            if not getattr(self, name):
                raise ConfigError(f"Identity.{name} is empty; load it with Identity.load")

    @classmethod
    def load(cls, *, ca: Path, cert: Path, key: Path) -> Identity:
        """Read and check a CA certificate, a certificate and its private key.

        Args:
            ca: PEM file of the CA certificate(s) to trust.
            cert: PEM file of this party's certificate.
            key: PEM file of the unencrypted private key matching ``cert``.

        Returns:
            The identity, with the files' bytes unchanged.

        Raises:
            ConfigError: A file is missing, unreadable or not valid PEM of its kind, the key is
                encrypted, or the key does not belong to the certificate (the message names
                the file).
        """
        ca_pem = _read_file(ca, what="CA certificate")
        cert_pem = _read_file(cert, what="certificate")
        key_pem = _read_file(key, what="private key")
        _parse_certs(ca_pem, path=ca, what="CA certificate")
        leaf = _parse_certs(cert_pem, path=cert, what="certificate")[0]
        private_key = _parse_key(key_pem, path=key)
        if _public_der(private_key.public_key()) != _public_der(leaf.public_key()):
            raise ConfigError(
                f"private key {key} does not belong to certificate {cert}; "
                "pass the key that was issued with it"
            )
        if key.stat().st_mode & 0o077:
            logger.warning("private key %s is readable by group or others; chmod 600 it", key)
        return cls(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem)


def init_ca(out_dir: Path, *, name: str = "federation-ca", validity_days: int = 3650) -> Path:
    """Create a federation CA: ``out_dir/ca.pem`` and ``out_dir/ca.key`` (mode 0600).

    The CA key is EC P-256; the certificate may sign end-entity certificates only
    (``BasicConstraints CA=True, path_len=0``; key usage certificate and CRL signing).

    Args:
        out_dir: Directory to write into; created (mode 0700) if missing.
        name: Subject common name of the CA (letters, digits, ``-_.``; 1 to 64 characters).
        validity_days: Lifetime of the CA certificate in days (at least 1).

    Returns:
        The path of the CA certificate, ``out_dir/ca.pem``.

    Raises:
        ConfigError: ``name`` or ``validity_days`` is invalid, or a CA already exists there.
    """
    _check_name(name, what="CA name")
    _check_validity_days(validity_days)
    cert_path, key_path = out_dir / CA_CERT_FILE, out_dir / CA_KEY_FILE
    _refuse_existing(cert_path, key_path, hint="a CA already exists there; it is never replaced")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_before = datetime.now(UTC) - _CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_pair(cert_path, cert, key_path, key)
    return cert_path


def issue(
    ca_dir: Path,
    *,
    name: str,
    role: Role,
    hosts: Sequence[str] = (),
    out_dir: Path | None = None,
    validity_days: int = 397,
    not_before: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a node or consumer certificate signed by the CA in ``ca_dir``.

    Writes ``<out_dir>/<name>.pem`` and ``<name>.key`` (mode 0600, EC P-256, unencrypted
    PKCS#8). The subject common name is ``name``; the subjectAltName always has
    ``DNS:<name>``. A node certificate adds ``hosts`` (IP literals as IP addresses, anything
    else as DNS names) and is valid for server and client auth; a consumer certificate is
    valid for client auth only and takes no ``hosts``.

    Args:
        ca_dir: Directory holding ``ca.pem`` and ``ca.key`` from :func:`init_ca`.
        name: Node or consumer name (letters, digits, ``-_.``; 1 to 64 characters).
        role: ``"node"`` or ``"consumer"``.
        hosts: Extra DNS names and IP addresses a node is reachable under.
        out_dir: Where to write; defaults to ``ca_dir``.
        validity_days: Lifetime in days (at least 1); 397 is the public-web maximum.
        not_before: Start of validity (timezone-aware); defaults to a few minutes ago.
            Tests pass a past date with a short lifetime to make expired certificates.

    Returns:
        The paths of the certificate and of its private key.

    Raises:
        ConfigError: An argument is invalid, the CA cannot be read, the certificate would
            outlive the CA, or ``<name>.pem`` / ``<name>.key`` already exists.
    """
    if role not in ("node", "consumer"):
        raise ConfigError(f"role must be 'node' or 'consumer'; got {role!r}")
    _check_name(name, what=f"{role} name")
    if role == "node" and not _NODE_NAME_RE.fullmatch(name):
        # node.name's rule (no '.'): a certificate no node config could name is useless.
        raise ConfigError(
            f"node name {name!r} is invalid: a node's name (node.name in its config) is 1 to "
            "64 letters, digits, '-' or '_'"
        )
    if role == "consumer" and hosts:
        raise ConfigError(f"consumer {name!r} cannot have hosts; got {list(hosts)!r}")
    _check_validity_days(validity_days)
    san = _subject_alt_names(name, hosts)
    start = (
        _as_utc(not_before, what="not_before") if not_before else datetime.now(UTC) - _CLOCK_SKEW
    )
    end = start + timedelta(days=validity_days)
    ca_cert, ca_key = _load_ca(ca_dir)
    if end > ca_cert.not_valid_after_utc:
        raise ConfigError(
            f"certificate {name!r} would be valid until {end:%Y-%m-%d}, after the CA expires "
            f"({ca_cert.not_valid_after_utc:%Y-%m-%d}); lower validity_days"
        )
    target = ca_dir if out_dir is None else out_dir
    cert_path, key_path = target / f"{name}.pem", target / f"{name}.key"
    _refuse_existing(cert_path, key_path, hint="remove it or choose another name")
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "node":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_pair(cert_path, cert, key_path, key)
    return cert_path, key_path


def common_name(cert_pem: bytes) -> str:
    """Return the subject common name of a PEM certificate.

    Raises:
        InvalidRequestError: ``cert_pem`` is not a PEM certificate or has no common name.
    """
    names = _cert(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise InvalidRequestError("certificate subject has no common name (CN)")
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def check_node_certificate(cert_pem: bytes, node_name: str) -> None:
    """Check that ``cert_pem`` can serve node ``node_name``: a server certificate whose DNS
    names include the node's name (coordinators verify a node under that name).

    Raises:
        ConfigError: a consumer (client-only) certificate, or one for another name.
    """
    cert = _cert(cert_pem)
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(common[0].value) if common else ""
    hint = f"issue one with `federation certs issue --role node --name {node_name} ...`"
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None  # no restriction: any use
    if usages is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        raise ConfigError(
            f"node.tls.cert: certificate {subject!r} is not a server certificate (no "
            f"serverAuth usage; a consumer's?); {hint}"
        )
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower().rstrip(".") for n in alt.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    # As gRPC checks the name: the DNS names (a wildcard covers one leftmost label), or,
    # without any, the common name.
    patterns = names or ([subject.lower().rstrip(".")] if subject else [])
    if not any(_dns_matches(pattern, node_name.lower()) for pattern in patterns):
        raise ConfigError(
            f"node.tls.cert: certificate {subject!r} does not name node {node_name!r} (its "
            f"DNS names: {', '.join(names) or 'none'}); coordinators verify a node by its "
            f"name and would refuse this one; {hint}"
        )


def check_trust_anchor(identity: Identity) -> None:
    """Check that a node's ``tls.ca`` holds a CA certificate that issued its ``tls.cert``.

    A node verifies every consumer against ``tls.ca``: with a leaf certificate there (the
    node's own, say) or another CA's, it starts, and then every consumer's handshake fails
    with a message that blames the consumer's certificate (found by review).

    Raises:
        ConfigError: no CA certificate (basicConstraints CA) in ``tls.ca``, or none of
            them issued ``tls.cert``.
    """
    cas = [c for c in x509.load_pem_x509_certificates(identity.ca_pem) if _is_ca(c)]
    if not cas:
        raise ConfigError(
            "tls.ca: holds no CA certificate (basicConstraints CA:TRUE), so no consumer "
            "certificate can be verified; give the federation CA's certificate (ca.pem), "
            "not a node's or consumer's"
        )
    leaf = _cert(identity.cert_pem)
    for ca in cas:
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise ConfigError(
        "tls.cert was not issued by a CA in tls.ca: consumers, issued by the federation CA, "
        "verify this node with the same CA; give that CA's certificate in tls.ca (a bundle "
        "may list several)"
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _dns_matches(pattern: str, name: str) -> bool:
    pattern = pattern.lower()
    if pattern.startswith("*."):
        label, _, rest = name.partition(".")
        return bool(label) and rest == pattern[2:]
    return pattern == name


def fingerprint(cert_pem: bytes) -> str:
    """Return the SHA-256 fingerprint of a certificate's DER, as lower-case hex (no colons).

    Raises:
        InvalidRequestError: ``cert_pem`` is not a PEM certificate.
    """
    return _cert(cert_pem).fingerprint(hashes.SHA256()).hex()


def serial_hex(cert_pem: bytes) -> str:
    """Return a certificate's serial number as lower-case hex without leading zeros.

    Raises:
        InvalidRequestError: ``cert_pem`` is not a PEM certificate.
    """
    return format(_cert(cert_pem).serial_number, "x")


def read_revocation_file(path: Path) -> frozenset[str]:
    """Read revoked certificates, one entry per line.

    An entry is a SHA-256 fingerprint (64 hex digits), a serial number (any other count of
    hex digits, at most 40 once leading zeros are dropped), or ``cn:<name>``; hex may have
    colons and any case. ``#`` starts a comment; blank lines are ignored. Entries come back
    normalized as :func:`is_revoked` expects: lower-case, no colons, serials without leading
    zeros, ``cn:`` names lower-case (so a name is revoked whatever its case).

    Args:
        path: The revocation file.

    Returns:
        The normalized entries.

    Raises:
        ConfigError: The file cannot be read or a line is malformed (named by its number).
    """
    text = _read_file(path, what="revocation file").decode("utf-8", errors="replace")
    entries: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.split("#", 1)[0].strip()
        if token:
            entries.add(_revocation_entry(token, path=path, line=number))
    return frozenset(entries)


def is_revoked(cert_pem: bytes, revoked: frozenset[str]) -> bool:
    """Say whether a certificate's fingerprint, serial or common name is in ``revoked``.

    Args:
        cert_pem: The PEM certificate, e.g. from :func:`peer_certificate`.
        revoked: Entries from :func:`read_revocation_file`.

    Raises:
        InvalidRequestError: ``cert_pem`` is not a PEM certificate.
    """
    keys = (fingerprint(cert_pem), serial_hex(cert_pem), f"cn:{common_name(cert_pem).lower()}")
    return any(key in revoked for key in keys)


def check_validity(cert_pem: bytes, *, now: datetime | None = None) -> None:
    """Check that a certificate is inside its validity period (bounds inclusive).

    Args:
        cert_pem: The PEM certificate.
        now: Timezone-aware time to check at; defaults to the current time.

    Raises:
        InvalidRequestError: The certificate has expired or is not yet valid (the message
            says which, with the dates), ``now`` is naive, or ``cert_pem`` is not PEM.
    """
    cert = _cert(cert_pem)
    at = datetime.now(UTC) if now is None else _as_utc(now, what="now", error=InvalidRequestError)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    label = f"certificate {common_name(cert_pem)!r} (serial {serial_hex(cert_pem)})"
    if at > end:
        raise InvalidRequestError(
            f"{label} expired at {end.isoformat()} (now {at.isoformat()}); issue a new one"
        )
    if at < start:
        raise InvalidRequestError(
            f"{label} is not yet valid: valid from {start.isoformat()} (now {at.isoformat()})"
        )


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Return TLS credentials for a node that require a client certificate from the CA."""
    return grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)],
        root_certificates=identity.ca_pem,
        require_client_auth=True,
    )


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """Return TLS credentials for a coordinator that present its client certificate.

    Pair them with the channel option ``("grpc.ssl_target_name_override", node_name)`` to
    verify the node's certificate against the expected node name (see the module docstring).
    """
    return grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )


def is_server_certificate(cert_pem: bytes) -> bool:
    """Say whether a certificate may serve TLS: a node's, or one valid for any use.

    ``issue(role="node")`` adds serverAuth; a consumer's certificate has clientAuth only.
    A certificate with no extended key usage, or with anyExtendedKeyUsage, is valid for
    every use, serving TLS included, so it counts as one that may serve.

    Raises:
        InvalidRequestError: ``cert_pem`` is not a PEM certificate.
    """
    cert = _cert(cert_pem)
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return (
        ExtendedKeyUsageOID.SERVER_AUTH in usage
        or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usage
    )


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """Return the subject common name of the caller's verified certificate, if any."""
    value = _auth_property(context, "x509_common_name")
    return None if value is None else value.decode("utf-8", errors="replace")


def peer_certificate(context: grpc.ServicerContext) -> bytes | None:
    """Return the caller's verified certificate as PEM bytes, if any."""
    return _auth_property(context, "x509_pem_cert")


def _auth_property(context: grpc.ServicerContext, key: str) -> bytes | None:
    """Return the first value of an auth-context property, or None."""
    # grpc hands out a list of bytes per property (the stubs say bytes): accept both.
    values: object = context.auth_context().get(key)
    if isinstance(values, bytes):
        return values or None
    if isinstance(values, list | tuple) and values and isinstance(values[0], bytes):
        return values[0] or None
    return None


def _check_name(name: str, *, what: str) -> None:
    """Refuse names that are not safe as file names, DNS labels and CNs."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.startswith("."):
        raise ConfigError(
            f"{what} {name!r} is invalid: use 1 to 64 letters, digits, '-', '_' or '.', "
            "not starting with '.'"
        )


def _check_validity_days(validity_days: int) -> None:
    """Refuse a lifetime below one day."""
    if isinstance(validity_days, bool) or not isinstance(validity_days, int) or validity_days < 1:
        raise ConfigError(f"validity_days must be an integer >= 1; got {validity_days!r}")


def _as_utc(moment: datetime, *, what: str, error: type[Exception] = ConfigError) -> datetime:
    """Return a timezone-aware datetime in UTC; refuse naive ones."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise error(f"{what} must be timezone-aware (e.g. datetime.now(UTC)); got {moment!r}")
    return moment.astimezone(UTC)


def _subject_alt_names(name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Return ``DNS:name`` followed by ``hosts`` as IP addresses or DNS names, deduplicated."""
    if isinstance(hosts, str):
        raise ConfigError(f"hosts must be a sequence of names; got the string {hosts!r}")
    names: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in hosts:
        general: x509.GeneralName
        try:
            general = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            if not re.fullmatch(r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?", host):
                raise ConfigError(
                    f"host {host!r} is neither an IP address nor a DNS name"
                ) from None
            general = x509.DNSName(host.rstrip("."))
        if general not in names:
            names.append(general)
    return names


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """Return key usage for a CA (``cert_sign``) or a TLS end entity."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA certificate and key that :func:`init_ca` wrote."""
    cert_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    cert = _parse_certs(_read_file(cert_path, what="CA certificate"), path=cert_path, what="CA")[0]
    key = _parse_key(_read_file(key_path, what="CA private key"), path=key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"CA private key {key_path} is not an EC key; create it with init_ca")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise ConfigError(f"CA private key {key_path} does not belong to {cert_path}")
    return cert, key


def _read_file(path: Path, *, what: str) -> bytes:
    """Read a whole file, turning OS errors into a ConfigError naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"{what} file {path} cannot be read: {err.strerror}") from err


def _parse_certs(data: bytes, *, path: Path, what: str) -> list[x509.Certificate]:
    """Parse one or more PEM certificates from a file's bytes."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise ConfigError(f"{what} file {path} is not a valid PEM certificate: {err}") from err
    if not certs:
        raise ConfigError(f"{what} file {path} holds no PEM certificate")
    return certs


def _parse_key(data: bytes, *, path: Path) -> PrivateKeyTypes:
    """Parse an unencrypted PEM private key from a file's bytes."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as err:
        raise ConfigError(f"private key file {path} is encrypted; provide it unencrypted") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"private key file {path} is not a valid PEM private key") from err


def _public_der(key: PublicKeyTypes) -> bytes:
    """Return a public key's SubjectPublicKeyInfo DER (for comparing keys)."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert(cert_pem: bytes) -> x509.Certificate:
    """Parse the first certificate of a PEM blob."""
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as err:
        raise InvalidRequestError(f"not a valid PEM certificate: {err}") from err


def _revocation_entry(token: str, *, path: Path, line: int) -> str:
    """Normalize one revocation entry, or raise naming the file and line."""
    where = f"revocation file {path} line {line}"
    if token[:3].lower() == "cn:":
        name = token[3:].strip()
        _check_name_for_line(name, where=where)
        return f"cn:{name.lower()}"
    digits = token.lower()
    groups = digits.split(":")
    if any(not group for group in groups) or not _HEX_RE.fullmatch(digits.replace(":", "")):
        raise ConfigError(
            f"{where}: {token!r} is not a SHA-256 fingerprint, a hex serial or 'cn:<name>'"
        )
    digits = digits.replace(":", "")
    if len(digits) == _FINGERPRINT_HEX_CHARS:
        return digits
    serial = digits.lstrip("0") or "0"
    if len(serial) <= _MAX_SERIAL_HEX_CHARS:
        return serial
    raise ConfigError(
        f"{where}: {len(digits)} hex digits fit neither a SHA-256 fingerprint (64) "
        f"nor a serial number (at most 40 without leading zeros)"
    )


def _check_name_for_line(name: str, *, where: str) -> None:
    """Refuse an invalid ``cn:`` name in a revocation file."""
    try:
        _check_name(name, what="name")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _refuse_existing(*paths: Path, hint: str) -> None:
    """Raise if any of ``paths`` exists, so keys are never silently replaced."""
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} already exists; {hint}")


def _write_pair(
    cert_path: Path,
    cert: x509.Certificate,
    key_path: Path,
    key: ec.EllipticCurvePrivateKey,
) -> None:
    """Write a private key (0600) then its certificate, never replacing a file."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(key_path, key_pem, mode=0o600)
    try:
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` and write ``data`` to it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; it is never replaced") from None
    except OSError as err:
        raise ConfigError(f"cannot create {path}: {err.strerror}") from err
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
