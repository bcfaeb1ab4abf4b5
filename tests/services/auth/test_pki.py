"""The cluster's CA: certificates chain to it, name loopback for servers, and keys stay private."""

from __future__ import annotations

import datetime
import ipaddress

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.auth import pki


def test_a_server_certificate_chains_to_the_ca_and_names_loopback(tmp_path):
    authority = pki.CertificateAuthority(tmp_path / "auth")
    paths = authority.issue("grpc-0", server=True)
    ca = x509.load_pem_x509_certificate(authority.cert_path.read_bytes())
    certificate = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    certificate.verify_directly_issued_by(ca)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages and ExtendedKeyUsageOID.CLIENT_AUTH in usages
    assert certificate.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) > datetime.timedelta(days=pki.RENEW_BEFORE_DAYS)


def test_private_keys_are_0600_in_0700_folders(tmp_path):
    authority = pki.CertificateAuthority(tmp_path / "auth")
    paths = authority.issue("admin")
    for key in (authority.key_path, paths.key):
        assert key.stat().st_mode & 0o777 == 0o600
    for folder in (authority.auth_dir, paths.key.parent):
        assert folder.stat().st_mode & 0o777 == 0o700


def test_issuing_again_keeps_a_good_certificate_and_replaces_one_of_another_ca(tmp_path):
    authority = pki.CertificateAuthority(tmp_path / "auth")
    first = authority.issue("coordinator-0").cert.read_bytes()
    assert authority.issue("coordinator-0").cert.read_bytes() == first
    stranger = pki.CertificateAuthority(tmp_path / "other")
    stranger_paths = stranger.issue("coordinator-0")
    authority.paths("coordinator-0").cert.write_bytes(stranger_paths.cert.read_bytes())
    reissued = authority.issue("coordinator-0")
    x509.load_pem_x509_certificate(reissued.cert.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(authority.cert_path.read_bytes())
    )


def test_issuing_again_with_other_usages_or_names_gives_a_certificate_that_has_them(tmp_path):
    authority = pki.CertificateAuthority(tmp_path / "auth")
    authority.issue("api")  # a client certificate first
    paths = authority.issue("api", server=True, dns_names=("api.internal",), ip_addresses=("10.0.0.7",))
    certificate = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["api.internal"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value


def test_a_certificate_whose_key_was_replaced_is_issued_anew(tmp_path):
    authority = pki.CertificateAuthority(tmp_path / "auth")
    first = authority.issue("admin")
    other = authority.issue("other")
    first.key.write_bytes(other.key.read_bytes())
    again = authority.issue("admin")
    assert again.cert.read_bytes() != other.cert.read_bytes()
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(again.key.read_bytes(), password=None)
    certificate = x509.load_pem_x509_certificate(again.cert.read_bytes())
    assert key.public_key().public_numbers() == certificate.public_key().public_numbers()
