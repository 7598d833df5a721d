"""Tests for federation.pki: CA, issuance, revocation and validity checks."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation import cli as federation_cli
from federation import pki
from federation.errors import ConfigError, InvalidRequestError


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    pki.init_ca(directory, name="test-ca")
    return directory


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_ca_writes_constrained_ca(tmp_path: Path) -> None:
    cert_path = pki.init_ca(tmp_path / "ca", name="my-ca", validity_days=30)
    assert cert_path == tmp_path / "ca" / "ca.pem"
    cert = _load(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "my-ca"
    assert cert.issuer == cert.subject
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30)
    cert.verify_directly_issued_by(cert)
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600


def test_init_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        pki.init_ca(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before


def test_init_ca_refuses_when_only_the_key_exists(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(b"old")
    with pytest.raises(ConfigError, match="ca.key"):
        pki.init_ca(tmp_path)
    assert not (tmp_path / "ca.pem").exists()


def test_issue_node_certificate(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, key_path = pki.issue(
        ca_dir,
        name="node-eu",
        role="node",
        hosts=["127.0.0.1", "::1", "node-eu.example.org", "node-eu"],
        out_dir=tmp_path,
    )
    assert (cert_path, key_path) == (tmp_path / "node-eu.pem", tmp_path / "node-eu.key")
    cert = _load(cert_path)
    cert.verify_directly_issued_by(_load(ca_dir / "ca.pem"))
    assert pki.common_name(cert_path.read_bytes()) == "node-eu"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-eu", "node-eu.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(key_path) == 0o600


def test_issue_consumer_certificate(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, key_path = pki.issue(ca_dir, name="acme-ai", role="consumer", out_dir=tmp_path)
    cert = _load(cert_path)
    assert pki.common_name(cert_path.read_bytes()) == "acme-ai"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName("acme-ai")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _mode(key_path) == 0o600


def test_issue_defaults_to_ca_dir(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    cert_path, key_path = pki.issue(tmp_path, name="acme-ai", role="consumer")
    assert cert_path.parent == key_path.parent == tmp_path


def test_issue_refuses_to_overwrite(ca_dir: Path, tmp_path: Path) -> None:
    pki.issue(ca_dir, name="twice", role="consumer", out_dir=tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        pki.issue(ca_dir, name="twice", role="consumer", out_dir=tmp_path)


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "has space", "slash/name", "../up", ".hidden", "ünï", "a:b"]
)
def test_issue_rejects_invalid_names(ca_dir: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid"):
        pki.issue(ca_dir, name=name, role="consumer", out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a", "A" * 64, "node_1.eu-west"])
def test_issue_accepts_valid_names(ca_dir: Path, tmp_path: Path, name: str) -> None:
    cert_path, _ = pki.issue(ca_dir, name=name, role="consumer", out_dir=tmp_path)
    assert pki.common_name(cert_path.read_bytes()) == name


def test_init_ca_rejects_invalid_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid"):
        pki.init_ca(tmp_path, name="bad name")


def test_issue_rejects_bad_arguments(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="role"):
        pki.issue(ca_dir, name="x", role="admin", out_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="hosts"):
        pki.issue(ca_dir, name="x", role="consumer", hosts=["h"], out_dir=tmp_path)
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        pki.issue(ca_dir, name="x", role="node", hosts=["bad host"], out_dir=tmp_path)
    with pytest.raises(ConfigError, match="validity_days"):
        pki.issue(ca_dir, name="x", role="node", validity_days=0, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="after the CA expires"):
        pki.issue(ca_dir, name="x", role="node", validity_days=100_000, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="timezone-aware"):
        pki.issue(ca_dir, name="x", role="node", not_before=datetime(2020, 1, 1), out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_issue_without_ca_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ca\.pem does not exist"):
        pki.issue(tmp_path, name="x", role="node")


def test_fingerprint_and_serial(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, _ = pki.issue(ca_dir, name="fp", role="consumer", out_dir=tmp_path)
    cert = _load(cert_path)
    pem = cert_path.read_bytes()
    assert pki.fingerprint(pem) == cert.fingerprint(hashes.SHA256()).hex()
    assert len(pki.fingerprint(pem)) == 64
    assert int(pki.serial_hex(pem), 16) == cert.serial_number
    assert pki.serial_hex(pem) == pki.serial_hex(pem).lower().lstrip("0")


def test_common_name_rejects_garbage() -> None:
    with pytest.raises(InvalidRequestError, match="PEM"):
        pki.common_name(b"not a certificate")


def _colons(hex_digits: str) -> str:
    return ":".join(hex_digits[i : i + 2] for i in range(0, len(hex_digits), 2))


def test_read_revocation_file_normalizes_entries(tmp_path: Path) -> None:
    fp = "AB" * 32
    path = tmp_path / "revoked.txt"
    path.write_text(
        "# revoked certificates\n"
        "\n"
        f"{_colons(fp)}\n"
        "  00:0A:1B  # serial with leading zeros and colons\n"
        "DEADBEEF\n"
        "cn:Old-Consumer\n"
        "CN: other\n"
    )
    assert pki.read_revocation_file(path) == frozenset(
        {"ab" * 32, "a1b", "deadbeef", "cn:old-consumer", "cn:other"}
    )


def test_read_empty_revocation_file(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("# nothing yet\n\n")
    assert pki.read_revocation_file(path) == frozenset()


@pytest.mark.parametrize(
    "bad", ["not-hex", "ab cd", "ab::cd", "a" * 41, "a" * 65, "cn:", "cn:bad name", "xyz:ab"]
)
def test_read_revocation_file_names_malformed_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text(f"# header\ndeadbeef\n{bad}\n")
    with pytest.raises(ConfigError, match=r"revoked\.txt line 3"):
        pki.read_revocation_file(path)


def test_read_missing_revocation_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.txt does not exist"):
        pki.read_revocation_file(tmp_path / "missing.txt")


def test_is_revoked_by_fingerprint_serial_or_name(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, _ = pki.issue(ca_dir, name="Acme-AI", role="consumer", out_dir=tmp_path)
    other_path, _ = pki.issue(ca_dir, name="other", role="consumer", out_dir=tmp_path)
    pem, other = cert_path.read_bytes(), other_path.read_bytes()
    path = tmp_path / "revoked.txt"
    for entry in (
        _colons(pki.fingerprint(pem)).upper(),
        "00" + pki.serial_hex(pem).upper(),
        "cn:acme-ai",
    ):
        path.write_text(entry + "\n")
        revoked = pki.read_revocation_file(path)
        assert pki.is_revoked(pem, revoked), entry
        assert not pki.is_revoked(other, revoked), entry
    assert not pki.is_revoked(pem, frozenset())


def test_check_validity_rejects_expired(ca_dir: Path, tmp_path: Path) -> None:
    start = datetime.now(UTC) - timedelta(days=30)
    cert_path, _ = pki.issue(
        ca_dir, name="old", role="consumer", out_dir=tmp_path, not_before=start, validity_days=1
    )
    with pytest.raises(InvalidRequestError, match="expired") as caught:
        pki.check_validity(cert_path.read_bytes())
    assert (start + timedelta(days=1)).date().isoformat() in str(caught.value)


def test_check_validity_rejects_not_yet_valid(ca_dir: Path, tmp_path: Path) -> None:
    start = datetime.now(UTC) + timedelta(days=2)
    cert_path, _ = pki.issue(
        ca_dir, name="future", role="consumer", out_dir=tmp_path, not_before=start
    )
    with pytest.raises(InvalidRequestError, match="not yet valid"):
        pki.check_validity(cert_path.read_bytes())


def test_check_validity_accepts_current_and_bounds(ca_dir: Path, tmp_path: Path) -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    cert_path, _ = pki.issue(
        ca_dir, name="bounds", role="consumer", out_dir=tmp_path, not_before=start, validity_days=1
    )
    pem = cert_path.read_bytes()
    pki.check_validity(pem, now=start)
    pki.check_validity(pem, now=start + timedelta(days=1))
    with pytest.raises(InvalidRequestError, match="expired"):
        pki.check_validity(pem, now=start + timedelta(days=1, seconds=1))
    with pytest.raises(InvalidRequestError, match="timezone-aware"):
        pki.check_validity(pem, now=datetime(2030, 1, 1, 12))


def _identity_files(ca_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    cert_path, key_path = pki.issue(ca_dir, name="acme-ai", role="consumer", out_dir=tmp_path)
    return ca_dir / "ca.pem", cert_path, key_path


def test_identity_load_round_trip(ca_dir: Path, tmp_path: Path) -> None:
    ca, cert, key = _identity_files(ca_dir, tmp_path)
    identity = pki.Identity.load(ca=ca, cert=cert, key=key)
    assert identity.ca_pem == ca.read_bytes()
    assert identity.cert_pem == cert.read_bytes()
    assert identity.key_pem == key.read_bytes()
    assert "PRIVATE KEY" not in repr(identity)


@pytest.mark.parametrize("which", ["ca", "cert", "key"])
def test_identity_load_names_missing_file(ca_dir: Path, tmp_path: Path, which: str) -> None:
    ca, cert, key = _identity_files(ca_dir, tmp_path)
    paths = {"ca": ca, "cert": cert, "key": key}
    paths[which] = tmp_path / f"missing-{which}.pem"
    with pytest.raises(ConfigError, match=f"missing-{which}.pem does not exist"):
        pki.Identity.load(**paths)


@pytest.mark.parametrize("which", ["ca", "cert", "key"])
def test_identity_load_names_invalid_file(ca_dir: Path, tmp_path: Path, which: str) -> None:
    ca, cert, key = _identity_files(ca_dir, tmp_path)
    paths = {"ca": ca, "cert": cert, "key": key}
    bad = tmp_path / f"garbage-{which}.pem"
    bad.write_bytes(b"-----BEGIN NONSENSE-----\nAAAA\n-----END NONSENSE-----\n")
    paths[which] = bad
    with pytest.raises(ConfigError, match=f"garbage-{which}.pem"):
        pki.Identity.load(**paths)


def test_identity_load_names_unreadable_file(ca_dir: Path, tmp_path: Path) -> None:
    ca, cert, _ = _identity_files(ca_dir, tmp_path)
    with pytest.raises(ConfigError, match=f"{tmp_path.name}.*cannot be read"):
        pki.Identity.load(ca=ca, cert=cert, key=tmp_path)  # a directory cannot be read


def test_identity_load_rejects_key_of_another_certificate(ca_dir: Path, tmp_path: Path) -> None:
    ca, cert, _ = _identity_files(ca_dir, tmp_path)
    _, other_key = pki.issue(ca_dir, name="other", role="consumer", out_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"other\.key does not belong"):
        pki.Identity.load(ca=ca, cert=cert, key=other_key)


def test_a_node_refuses_to_serve_with_a_certificate_that_is_not_its_own(
    ca_dir: Path, tmp_path: Path
) -> None:
    node_pem = pki.issue(ca_dir, name="hong-kong", role="node", out_dir=tmp_path)[0].read_bytes()
    pki.check_node_certificate(node_pem, "hong-kong")
    pki.check_node_certificate(node_pem, "Hong-Kong")  # DNS names compare case-insensitively
    with pytest.raises(ConfigError, match="does not name node 'shenzhen'"):
        pki.check_node_certificate(node_pem, "shenzhen")
    consumer_pem = pki.issue(ca_dir, name="acme-ai", role="consumer", out_dir=tmp_path)[0]
    with pytest.raises(ConfigError, match="not a server certificate"):
        pki.check_node_certificate(consumer_pem.read_bytes(), "acme-ai")


def _server_cert(
    ca_dir: Path,
    common: str | None,
    dns: list[str],
    usages: list[x509.ObjectIdentifier] | None = None,
) -> bytes:
    """A certificate made outside `federation certs` (no SAN when ``dns`` is empty), with
    extended key usage ``usages`` (serverAuth by default; an empty list: no extension)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_cert, ca_key = pki._load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)] if common else [])
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
    )
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if usages is None else usages
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if dns:
        names = [x509.DNSName(d) for d in dns]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_the_node_name_check_accepts_what_grpc_accepts(ca_dir: Path) -> None:
    pki.check_node_certificate(_server_cert(ca_dir, "hong-kong", []), "hong-kong")  # CN only
    wildcard = _server_cert(ca_dir, "nodes", ["*.nodes.example"])
    pki.check_node_certificate(wildcard, "hk.nodes.example")
    with pytest.raises(ConfigError, match="does not name node"):
        pki.check_node_certificate(wildcard, "a.b.nodes.example")  # one label only
    with pytest.raises(ConfigError, match="does not name node"):
        pki.check_node_certificate(_server_cert(ca_dir, "hong-kong", ["other"]), "hong-kong")
    pki.check_node_certificate(_server_cert(ca_dir, None, ["hong-kong"]), "hong-kong")  # no CN
    pki.check_node_certificate(_server_cert(ca_dir, "x", ["hong-kong."]), "hong-kong")


def test_only_a_client_only_certificate_counts_as_one_that_cannot_serve(
    ca_dir: Path, tmp_path: Path
) -> None:
    # Nodes refuse a certificate that may serve TLS as a consumer: a node's, and one with
    # no extended key usage or anyExtendedKeyUsage (valid for every use; review finding).
    node = pki.issue(ca_dir, name="hk-serve", role="node", out_dir=tmp_path)[0]
    consumer = pki.issue(ca_dir, name="acme-serve", role="consumer", out_dir=tmp_path)[0]
    assert pki.is_server_certificate(node.read_bytes())
    assert not pki.is_server_certificate(consumer.read_bytes())
    assert pki.is_server_certificate(_server_cert(ca_dir, "x", [], usages=[]))
    any_use = [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]
    assert pki.is_server_certificate(_server_cert(ca_dir, "x", [], usages=any_use))
    client = [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not pki.is_server_certificate(_server_cert(ca_dir, "x", [], usages=client))


def test_a_nodes_trust_anchor_must_be_the_ca_that_issued_it(ca_dir: Path, tmp_path: Path) -> None:
    # Found by review: a leaf or another CA's certificate in tls.ca was accepted, and every
    # consumer's handshake then failed with a message that blamed the consumer.
    cert, key = pki.issue(ca_dir, name="hong-kong", role="node", out_dir=tmp_path / "n")
    good = pki.Identity.load(ca=ca_dir / "ca.pem", cert=cert, key=key)
    pki.check_trust_anchor(good)
    own_leaf = pki.Identity.load(ca=cert, cert=cert, key=key)
    with pytest.raises(ConfigError, match="tls.ca: holds no CA certificate"):
        pki.check_trust_anchor(own_leaf)
    other = pki.init_ca(tmp_path / "other", name="other-ca")
    foreign = pki.Identity.load(ca=other, cert=cert, key=key)
    with pytest.raises(ConfigError, match="tls.cert was not issued by a CA in tls.ca"):
        pki.check_trust_anchor(foreign)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.read_bytes() + (ca_dir / "ca.pem").read_bytes())
    pki.check_trust_anchor(pki.Identity.load(ca=bundle, cert=cert, key=key))


def test_a_node_certificate_takes_only_a_name_a_node_config_can_have(
    ca_dir: Path, tmp_path: Path
) -> None:
    # Found by review: "hk.node" was issued, but node.name refuses '.', so no node could
    # ever use it. A consumer's name may have dots (quoted in a node config).
    with pytest.raises(ConfigError, match="node name 'hk.node' is invalid"):
        pki.issue(ca_dir, name="hk.node", role="node", out_dir=tmp_path)
    pki.issue(ca_dir, name="acme.ai", role="consumer", out_dir=tmp_path)


def test_certs_issue_names_its_own_days_flag(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["certs", "issue", "--ca", str(ca_dir), "--name", "acme", "--role", "consumer"]
    assert federation_cli.main([*argv, "--out", str(tmp_path), "--days", "0"]) == 2
    assert "--days must be >= 1; got 0" in capsys.readouterr().err
