"""Signed receipts: what a node signs for each release, and how a consumer checks one.

A node appends a ``release`` entry to its audit chain before it sends a release, and the
response carries a :class:`~federation.releases.Receipt` for that entry. Two byte strings
are defined here, exactly, so that anyone can recompute them from what they received:

**Payload digest** (``Receipt.payload_sha256``): SHA-256, lower-case hex, of
``canonical_json(payload)``, where the payload is the JSON object of everything the node
released that depends on data. For ``Analyze`` it is :func:`analyze_payload`::

    {"bin_edges": [...], "bin_labels": [...], "groups": [{"group": "", "measurements":
      [{"center": 0.0, "name": "count", "noise": {"granularity": 1.0, "mechanism":
      "laplace", "scale": 2.0, "sensitivity": 1.0}, "values": [1234.0]}]}],
     "operation": "analyze", "version": 1}

A value withheld by the node's minimum-cohort guard (NaN) is written as ``null``. Budgets
and the receipt itself are not in it (the cost is in the signed receipt).
``canonical_json`` is ``json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)``: keys sorted by code point, no whitespace, numbers
as Python's shortest round-trip ``repr`` of the IEEE-754 double (``1.0``, ``0.1``,
``1e-06``), so a value parsed back from the JSON re-serialises to the same bytes.

**Receipt signature** (``Receipt.signature``): the node's signature over
``b"federation-receipt-v1\\n" + canonical_json(fields)`` (:func:`receipt_message`) where
``fields`` are the receipt's id, sequence (the consumer's release number at the node: 1,
2, ...), node, consumer, operation, issued_at, epsilon, delta, charge_id, payload_sha256
and key_id. ECDSA P-256 with SHA-256 (DER signature) when
the node signs with its TLS key, or Ed25519 for a plaintext development node. ``key_id``
is the first 32 hex digits of SHA-256 over the key's SubjectPublicKeyInfo DER.

A receipt proves *what* (the digest of the released values), *how much* (the cost) and
*from whom*: the signing key belongs to a certificate that the federation CA issued to the
node's name (:func:`verify_receipt` with ``ca_pem``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from federation.errors import FederationError
from federation.pki import is_server_certificate
from federation.releases import GroupRelease, Receipt, Release

__all__ = [
    "RECEIPT_VERSION",
    "ReceiptError",
    "ReceiptRecord",
    "VerificationKey",
    "analyze_payload",
    "canonical_json",
    "find_receipt_records",
    "key_id_of",
    "payload_sha256",
    "receipt_from_dict",
    "receipt_message",
    "receipt_to_dict",
    "release_payload",
    "verify_receipt",
    "verify_records",
    "verify_signature",
]

RECEIPT_VERSION = 1
_RECEIPT_DOMAIN = b"federation-receipt-v1\n"
KEY_ID_HEX_CHARS = 32
# Certificates are backdated a few minutes at issue (federation.pki): allow the same skew.
_SKEW_S = 300.0


class ReceiptError(FederationError):
    """A receipt does not verify: wrong digest, bad signature, or an untrusted key."""


# ------------------------------------------------------------------ bytes that are hashed


def canonical_json(value: object) -> bytes:
    """Serialise ``value`` canonically (sorted keys, no spaces, shortest round-trip floats).

    >>> canonical_json({"b": [1.0, 0.1], "a": "x"})
    b'{"a":"x","b":[1.0,0.1]}'

    Raises:
        ValueError: ``value`` holds NaN or an infinity (never part of a release).
    """
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def payload_sha256(payload: Mapping[str, object]) -> str:
    """Return the hex SHA-256 of ``canonical_json(payload)``: a receipt's payload digest."""
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def analyze_payload(
    groups: Sequence[GroupRelease], *, bin_labels: Sequence[str], bin_edges: Sequence[float]
) -> dict[str, object]:
    """Return the JSON object of an Analyze release whose digest its receipt carries."""
    return {
        "version": RECEIPT_VERSION,
        "operation": "analyze",
        "bin_labels": [str(label) for label in bin_labels],
        "bin_edges": [float(edge) for edge in bin_edges],
        "groups": [
            {
                "group": g.group,
                "measurements": [
                    {
                        "name": m.name,
                        "values": [_value(v) for v in m.values],
                        "center": float(m.center),
                        "noise": {
                            "mechanism": m.noise.mechanism.value,
                            "scale": float(m.noise.scale),
                            "sensitivity": float(m.noise.sensitivity),
                            "granularity": float(m.noise.granularity),
                        },
                    }
                    for m in g.measurements
                ],
            }
            for g in groups
        ],
    }


def _value(value: float) -> float | None:
    """A released value; a suppressed one (NaN) as None (JSON null)."""
    number = float(value)
    return None if math.isnan(number) else number


def release_payload(release: Release) -> dict[str, object]:
    """Return the payload of a received Analyze release (see :func:`analyze_payload`)."""
    return analyze_payload(
        release.groups, bin_labels=release.bin_labels, bin_edges=release.bin_edges
    )


# ------------------------------------------------------------------ bytes that are signed


def _receipt_fields(receipt: Receipt) -> dict[str, object]:
    return {
        "version": RECEIPT_VERSION,
        "id": receipt.id,
        "sequence": receipt.sequence,
        "node": receipt.node_name,
        "consumer": receipt.consumer,
        "operation": receipt.operation,
        "issued_at": float(receipt.issued_at),
        "epsilon": float(receipt.epsilon),
        "delta": float(receipt.delta),
        "charge_id": receipt.charge_id,
        "payload_sha256": receipt.payload_sha256,
        "key_id": receipt.key_id,
    }


def receipt_message(receipt: Receipt) -> bytes:
    """Return the exact bytes a node signs for ``receipt`` (its signature excluded)."""
    return _RECEIPT_DOMAIN + canonical_json(_receipt_fields(receipt))


def key_id_of(public_key: PublicKeyTypes) -> str:
    """Return a key's id: the first 32 hex digits of SHA-256 over its SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:KEY_ID_HEX_CHARS]


def verify_signature(public_key: PublicKeyTypes, message: bytes, signature: bytes) -> bool:
    """Say whether ``signature`` is a valid ECDSA-P256-SHA256 or Ed25519 signature."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A node's receipt-verification key: a certificate (TLS node) or a bare public key."""

    public_key: PublicKeyTypes
    certificate: x509.Certificate | None

    @classmethod
    def from_pem(cls, pem: bytes) -> VerificationKey:
        """Parse a PEM certificate or public key.

        Raises:
            ReceiptError: the bytes are neither.
        """
        if b"-----BEGIN CERTIFICATE-----" in pem:
            try:
                cert = x509.load_pem_x509_certificate(pem)
            except ValueError as err:
                raise ReceiptError(f"node certificate is not valid PEM: {err}") from err
            return cls(public_key=cert.public_key(), certificate=cert)
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as err:
            raise ReceiptError(
                "node key is neither a PEM certificate nor a PEM public key"
            ) from err
        return cls(public_key=key, certificate=None)

    @property
    def key_id(self) -> str:
        """The key's id (see :func:`key_id_of`)."""
        return key_id_of(self.public_key)

    def issued_by(self, ca_pem: bytes) -> bool:
        """Whether a CA in ``ca_pem`` issued this key's certificate (False for a bare key).

        Raises:
            ReceiptError: ``ca_pem`` holds no valid PEM certificate.
        """
        cas = _load_cas(ca_pem)
        return self.certificate is not None and any(_issued_by(self.certificate, ca) for ca in cas)

    def check_issued(self, *, ca_pem: bytes, node_name: str) -> None:
        """Check that the federation CA issued this certificate to ``node_name``.

        Raises:
            ReceiptError: a bare key (no certificate), another issuer, another name, or a
                certificate that cannot serve a node (a consumer's: clientAuth only).
        """
        if self.certificate is None:
            raise ReceiptError(
                f"node {node_name!r} signs with a bare key, not a CA-issued certificate; "
                "if you trust that key, pass it itself (receipts verify: --node-cert "
                "NODE=PEM; audit verify: --trust-key)"
            )
        if not self.issued_by(ca_pem):
            raise ReceiptError(f"certificate of node {node_name!r} was not issued by the given CA")
        if node_name not in _cert_names(self.certificate):
            raise ReceiptError(
                f"certificate names {sorted(_cert_names(self.certificate))}, not node {node_name!r}"
            )
        if not is_server_certificate(self.certificate.public_bytes(serialization.Encoding.PEM)):
            # The same CA issues consumers' certificates: one named like a node must not
            # vouch for that node's receipts or audit chain.
            raise ReceiptError(
                f"certificate named {node_name!r} is not a node's (no serverAuth usage: a "
                "consumer's certificate), so it cannot sign for node "
                f"{node_name!r}"
            )


def _load_cas(ca_pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(ca_pem)
    except ValueError as err:
        raise ReceiptError(f"CA file is not a valid PEM certificate: {err}") from err


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _cert_names(cert: x509.Certificate) -> set[str]:
    names = {str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return names
    return names | set(san.value.get_values_for_type(x509.DNSName))


def verify_receipt(
    receipt: Receipt,
    *,
    key: VerificationKey,
    payload: Mapping[str, object] | None = None,
    ca_pem: bytes | None = None,
) -> None:
    """Check a receipt's signature, and optionally its payload and its key's issuer.

    Args:
        receipt: the receipt as received (or loaded with :func:`receipt_from_dict`).
        key: the node's verification key (its certificate, or a trusted bare key).
        payload: the released values as :func:`release_payload` builds them; their digest
            must equal ``receipt.payload_sha256``.
        ca_pem: the federation CA: the key's certificate must be issued by it to the
            receipt's node, and valid when the receipt was issued.

    Raises:
        ReceiptError: the first check that fails, named.
    """
    who = f"receipt {receipt.id} from node {receipt.node_name!r}"
    if payload is not None:
        digest = payload_sha256(payload)
        if digest != receipt.payload_sha256:
            raise ReceiptError(
                f"{who}: the released values hash to {digest}, but the receipt signs "
                f"{receipt.payload_sha256}: the values were altered"
            )
    if key.key_id != receipt.key_id:
        raise ReceiptError(f"{who} was signed by key {receipt.key_id}, not by {key.key_id}")
    if ca_pem is not None:
        key.check_issued(ca_pem=ca_pem, node_name=receipt.node_name)
        assert key.certificate is not None
        _check_validity_at(key.certificate, receipt.issued_at, who=who)
    if not verify_signature(key.public_key, receipt_message(receipt), receipt.signature):
        raise ReceiptError(f"{who}: the signature does not verify (receipt altered or forged)")


def _check_validity_at(cert: x509.Certificate, issued_at: float, *, who: str) -> None:
    if not math.isfinite(issued_at):
        raise ReceiptError(f"{who}: issued_at is not a finite time")
    at = datetime.fromtimestamp(issued_at, tz=UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start.timestamp() - _SKEW_S <= issued_at <= end.timestamp():
        raise ReceiptError(
            f"{who}: issued at {at.isoformat()}, outside its certificate's validity "
            f"({start.isoformat()} to {end.isoformat()})"
        )


# ------------------------------------------------------------------ storage as JSON


def receipt_to_dict(receipt: Receipt) -> dict[str, object]:
    """Return a JSON-ready dictionary of a receipt (signature in base64)."""
    return {
        "id": receipt.id,
        "sequence": receipt.sequence,
        "node": receipt.node_name,
        "consumer": receipt.consumer,
        "operation": receipt.operation,
        "issued_at": receipt.issued_at,
        "epsilon": receipt.epsilon,
        "delta": receipt.delta,
        "charge_id": receipt.charge_id,
        "payload_sha256": receipt.payload_sha256,
        "key_id": receipt.key_id,
        "signature": base64.b64encode(receipt.signature).decode("ascii"),
    }


def receipt_from_dict(data: Mapping[str, object]) -> Receipt:
    """Read what :func:`receipt_to_dict` wrote.

    Raises:
        ReceiptError: a field is missing or has the wrong type.
    """
    try:
        signature = base64.b64decode(_text(data, "signature"), validate=True)
    except binascii.Error as err:
        raise ReceiptError(f"receipt signature is not base64: {err}") from err
    return Receipt(
        id=_text(data, "id"),
        node_name=_text(data, "node"),
        consumer=_text(data, "consumer"),
        issued_at=_number(data, "issued_at"),
        payload_sha256=_text(data, "payload_sha256"),
        signature=signature,
        key_id=_text(data, "key_id"),
        sequence=int(_number(data, "sequence")),
        epsilon=_number(data, "epsilon"),
        delta=_number(data, "delta"),
        operation=_text(data, "operation"),
        charge_id=_text(data, "charge_id"),
    )


def _text(data: Mapping[str, object], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ReceiptError(f"receipt field {key!r} must be a string; got {value!r}")
    return value


def _number(data: Mapping[str, object], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReceiptError(f"receipt field {key!r} must be a number; got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class ReceiptRecord:
    """A receipt kept with what it covers: the released values and the node's key.

    This is the shape a coordinator stores with query results and training checkpoints
    (``{"node", "receipt", "released", "node_key"}``), and what
    ``federation receipts verify`` checks.
    """

    node: str
    receipt: Receipt
    released: Mapping[str, object]
    node_key_pem: str = ""

    def to_dict(self) -> dict[str, object]:
        """Return the JSON-ready form."""
        return {
            "node": self.node,
            "receipt": receipt_to_dict(self.receipt),
            "released": dict(self.released),
            "node_key": self.node_key_pem,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ReceiptRecord:
        """Read what :meth:`to_dict` wrote (or a query result's per-node entry).

        Raises:
            ReceiptError: the receipt or the released values are missing or malformed.
        """
        receipt = data.get("receipt")
        released = data.get("released")
        if not isinstance(receipt, Mapping) or not isinstance(released, Mapping):
            raise ReceiptError("a receipt record needs 'receipt' and 'released' objects")
        node = data.get("node", "")
        key = data.get("node_key", "")
        return cls(
            node=node if isinstance(node, str) else "",
            receipt=receipt_from_dict(receipt),
            released=released,
            node_key_pem=key if isinstance(key, str) else "",
        )


def find_receipt_records(document: object) -> Iterator[ReceiptRecord]:
    """Yield every receipt record in a JSON document (query result, list, checkpoint).

    A record is any object holding both a ``receipt`` object and a ``released`` object,
    at any depth: ``federation query --json`` output, a list of them, or a checkpoint.
    """
    if isinstance(document, Mapping):
        if isinstance(document.get("receipt"), Mapping) and isinstance(
            document.get("released"), Mapping
        ):
            yield ReceiptRecord.from_dict(document)
            return
        for value in document.values():
            yield from find_receipt_records(value)
    elif isinstance(document, list):
        for item in document:
            yield from find_receipt_records(item)


def verify_records(
    records: Sequence[ReceiptRecord],
    *,
    ca_pem: bytes | None = None,
    node_keys: Mapping[str, bytes] | None = None,
) -> list[tuple[ReceiptRecord, str | None]]:
    """Verify stored receipt records; return each with None (verified) or why it failed.

    A node's key is ``node_keys[node]`` if given (trusted as is, and still checked against
    ``ca_pem`` when that is given); otherwise the certificate stored with the record, which
    must then be issued by ``ca_pem`` to the node. Without either, nothing proves who
    signed, and the record fails.
    """
    keys = dict(node_keys or {})
    results: list[tuple[ReceiptRecord, str | None]] = []
    for record in records:
        node = record.receipt.node_name
        try:
            if record.node and record.node != node:
                raise ReceiptError(f"stored for node {record.node!r} but issued by {node!r}")
            if node in keys:
                key = VerificationKey.from_pem(keys[node])
            elif record.node_key_pem and ca_pem is not None:
                key = VerificationKey.from_pem(record.node_key_pem.encode("ascii", "replace"))
            else:
                raise ReceiptError(
                    f"no trusted key for node {node!r}: pass the federation CA (--ca) or "
                    f"the node's certificate or key (--node-cert {node}=PEM)"
                )
            verify_receipt(record.receipt, key=key, payload=record.released, ca_pem=ca_pem)
        except (ReceiptError, ValueError) as err:
            results.append((record, str(err)))
        else:
            results.append((record, None))
    return results
