"""The cluster's own certificate authority, and a certificate per process (mTLS).

    <auth dir>/ca.pem, ca.key              the CA (the key stays here: it only signs)
    <auth dir>/certs/<name>.pem, .key      one certificate per process or client

Private keys are written 0600 in 0700 folders, readable only by the user that
made them. Made with the `cryptography` package (ECDSA P-256, SHA-256); nothing
shells out to openssl. Issuing is idempotent: a certificate that exists, is
signed by this CA and is not near its end is kept.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "corebank local CA"
CA_VALIDITY_DAYS = 3650
CERT_VALIDITY_DAYS = 365
# A certificate with less than this left is issued anew by the next `make up`.
RENEW_BEFORE_DAYS = 30
# Where a local server listens: every server certificate names both.
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
CERTS_DIR = "certs"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"


@dataclasses.dataclass(frozen=True)
class CertificatePaths:
    cert: pathlib.Path
    key: pathlib.Path


def write_private(path: pathlib.Path, data: bytes) -> None:
    """Write a secret so that it is 0600 from its first byte (no window where others may read it,
    no symlink followed), on disk before it replaces the old one; readers never see half of it.
    The one writer of the state folder's secrets: keys, passfiles, cluster.json."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    scratch = path.with_name(path.name + ".tmp")
    scratch.unlink(missing_ok=True)
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    scratch.replace(path)


def write_public(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_bytes(data)
    scratch.chmod(PUBLIC_FILE_MODE)
    scratch.replace(path)


def _private_key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class CertificateAuthority:
    def __init__(self, auth_dir: pathlib.Path) -> None:
        self.auth_dir = pathlib.Path(auth_dir).absolute()

    @property
    def cert_path(self) -> pathlib.Path:
        return self.auth_dir / CA_CERT_FILE

    @property
    def key_path(self) -> pathlib.Path:
        return self.auth_dir / CA_KEY_FILE

    def paths(self, name: str) -> CertificatePaths:
        return CertificatePaths(self.auth_dir / CERTS_DIR / f"{name}.pem", self.auth_dir / CERTS_DIR / f"{name}.key")

    def ensure(self) -> None:
        """Make the CA once; later calls keep it (every certificate hangs on it)."""
        self.auth_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        self.auth_dir.chmod(PRIVATE_DIR_MODE)
        if self.cert_path.exists() and self.key_path.exists():
            return
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(self.key_path, _private_key_bytes(key))
        write_public(self.cert_path, certificate.public_bytes(serialization.Encoding.PEM))

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        certificate = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return certificate, key

    def issue(
        self, name: str, *, server: bool = False, client: bool = True,
        dns_names: tuple[str, ...] = LOOPBACK_NAMES, ip_addresses: tuple[str, ...] = LOOPBACK_ADDRESSES,
    ) -> CertificatePaths:
        """A certificate for `name` (its common name), for TLS servers, clients or both; kept if still good."""
        self.ensure()
        paths = self.paths(name)
        ca_certificate, ca_key = self._load()
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        alternative_names: list[x509.GeneralName] = []
        if server:
            alternative_names = [x509.DNSName(n) for n in dns_names]
            alternative_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        if self._still_good(paths, ca_certificate, usages, alternative_names):
            return paths
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if alternative_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        certificate = builder.sign(ca_key, hashes.SHA256())
        write_private(paths.key, _private_key_bytes(key))
        write_public(paths.cert, certificate.public_bytes(serialization.Encoding.PEM))
        return paths

    def _still_good(
        self, paths: CertificatePaths, ca_certificate: x509.Certificate, usages: list, alternative_names: list[x509.GeneralName]
    ) -> bool:
        """The certificate there is this CA's, for the usages and names asked, matches its key, and is not near its end."""
        if not (paths.cert.exists() and paths.key.exists()):
            return False
        try:
            certificate = x509.load_pem_x509_certificate(paths.cert.read_bytes())
            certificate.verify_directly_issued_by(ca_certificate)
            key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
            held_usages = list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
            try:
                held_names = list(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
            except x509.ExtensionNotFound:
                held_names = []
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            return False
        same_key = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return (
            same_key and held_usages == usages and held_names == alternative_names
            and certificate.not_valid_after_utc - _now() > datetime.timedelta(days=RENEW_BEFORE_DAYS)
        )
