"""Make the Secrets the Kubernetes manifests name, from a folder that stays outside git.

    python deploy/k8s/make_secrets.py --secrets-dir ~/corebank-k8s-secrets --namespace corebank \
        | kubectl apply -f -

The folder (made 0700 on first use, kept like any CA) holds the cluster's CA with its key, the
gRPC server's certificate, the token signing keys (services/auth: the same code `make up`
uses) and the database passwords. Running it again keeps all of them (certificates are issued
anew only near their end) and prints the same Secrets. Only what the pods need goes into the
cluster: ca.pem without the CA's key, the public token keys without the signing keys.
Mint tokens with the same folder (services/auth/tokens.py mint).
"""

from __future__ import annotations

import argparse
import base64
import pathlib
import secrets
import sys

import yaml

from deploy.postgres import DATABASE_NAME
from services.auth import pki, tokens
from services.storage.roles import DatabaseRole

GRPC_CERTIFICATE = "grpc"
GRPC_SERVICE = "corebank-grpc"
PASSWORDS_DIR = "k8s-passwords"
PASSWORD_BYTES = 32
# The PostgreSQL passwords Patroni sets at bootstrap, beside the corebank roles' own.
PATRONI_PASSWORDS = ("superuser-password", "replication-password")
# Secret name -> the corebank role whose libpq passfile it holds (file name as in deploy/postgres.py).
PASSFILE_SECRETS = {"corebank-db-service": DatabaseRole.SERVICE, "corebank-db-auditor": DatabaseRole.AUDITOR}
SECRET_NAMES = ("corebank-ca", "corebank-grpc-tls", "corebank-token-keys", *PASSFILE_SECRETS, "corebank-patroni")


def password(secrets_dir: pathlib.Path, name: str) -> str:
    """The password called `name`: made once, then read back."""
    path = secrets_dir / PASSWORDS_DIR / name
    if not path.exists():
        pki.write_private(path, secrets.token_urlsafe(PASSWORD_BYTES).encode())
    return path.read_text().strip()


def passfile_name(role: DatabaseRole) -> str:
    return f"{role.name.lower()}.pgpass"


def secret(name: str, namespace: str, files: dict[str, bytes], secret_type: str = "Opaque") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "corebank"}},
        "type": secret_type,
        "data": {key: base64.b64encode(value).decode() for key, value in sorted(files.items())},
    }


def make_secrets(secrets_dir: pathlib.Path, namespace: str) -> list[dict]:
    authority = pki.CertificateAuthority(secrets_dir)
    service_names = (GRPC_SERVICE, f"{GRPC_SERVICE}.{namespace}", f"{GRPC_SERVICE}.{namespace}.svc")
    grpc_paths = authority.issue(GRPC_CERTIFICATE, server=True, client=False, dns_names=service_names, ip_addresses=())
    tokens.ensure_signing_key(secrets_dir)
    public_keys = {path.name: path.read_bytes() for path in sorted(tokens.keys_dir(secrets_dir).glob("*.pub"))}
    passfiles = {
        name: {passfile_name(role): f"*:*:{DATABASE_NAME}:{role}:{password(secrets_dir, str(role))}\n".encode()}
        for name, role in PASSFILE_SECRETS.items()
    }
    return [
        secret("corebank-ca", namespace, {"ca.pem": authority.cert_path.read_bytes()}),
        secret("corebank-grpc-tls", namespace, {"tls.crt": grpc_paths.cert.read_bytes(), "tls.key": grpc_paths.key.read_bytes()},
               "kubernetes.io/tls"),
        secret("corebank-token-keys", namespace, public_keys),
        *(secret(name, namespace, files) for name, files in passfiles.items()),
        secret("corebank-patroni", namespace, {key: password(secrets_dir, key).encode() for key in PATRONI_PASSWORDS}),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--secrets-dir", type=pathlib.Path, required=True, help="kept outside git: CA, keys, passwords")
    parser.add_argument("--namespace", default="corebank", help="the overlay's namespace (corebank, corebank-dev)")
    arguments = parser.parse_args()
    yaml.safe_dump_all(make_secrets(arguments.secrets_dir, arguments.namespace), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
