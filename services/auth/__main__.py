"""Tokens and certificates of a corebank cluster.

    python -m services.auth mint --role ROLE --subject SUBJECT [--ttl-seconds N]
    python -m services.auth issue-cert --name NAME [--server] [--dns NAME ...] [--ip ADDRESS ...]
    python -m services.auth rotate-key
    python -m services.auth retire-key KID

The cluster is found by --state-dir, else --cluster (its cluster.json), else
$COREBANK_STATE_DIR, else .corebank. `mint` prints the token alone on stdout;
`issue-cert` prints the certificate's and key's paths (see README: Connecting).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from services.auth import auth_dir, pki, tokens
from services.ledger import errors

STATE_DIR_VARIABLE = "COREBANK_STATE_DIR"
DEFAULT_STATE_DIR = ".corebank"


def _state_dir(arguments: argparse.Namespace) -> pathlib.Path:
    if arguments.state_dir:
        return pathlib.Path(arguments.state_dir)
    if arguments.cluster:
        return pathlib.Path(json.loads(pathlib.Path(arguments.cluster).read_text())["state_dir"])
    return pathlib.Path(os.environ.get(STATE_DIR_VARIABLE) or DEFAULT_STATE_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.auth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Where the cluster is: before or after the command (`--state-dir X mint ...` or `mint ... --state-dir X`).
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--state-dir", default=argparse.SUPPRESS, help="the cluster's state folder")
    where.add_argument("--cluster", default=argparse.SUPPRESS, help="the cluster's cluster.json")
    parser.add_argument("--state-dir", help="the cluster's state folder")
    parser.add_argument("--cluster", help="the cluster's cluster.json")
    commands = parser.add_subparsers(dest="command", required=True)
    mint = commands.add_parser("mint", help="print a signed token", parents=[where])
    mint.add_argument("--role", required=True, choices=[role.value for role in tokens.Role])
    mint.add_argument("--subject", required=True, help="who: a customer's owner_id, a service's or a person's name")
    mint.add_argument("--ttl-seconds", type=int, default=tokens.TOKEN_TTL_SECONDS_DEFAULT)
    issue = commands.add_parser("issue-cert", help="issue a certificate signed by the cluster's CA", parents=[where])
    issue.add_argument("--name", required=True, help="the certificate's common name (a service's name)")
    issue.add_argument("--server", action="store_true", help="also for serving TLS (adds the names below)")
    issue.add_argument("--dns", action="append", default=[], help="a DNS name of a server (repeatable)")
    issue.add_argument("--ip", action="append", default=[], help="an IP address of a server (repeatable)")
    commands.add_parser("rotate-key", help="make a new token signing key current (old tokens stay valid)", parents=[where])
    retire = commands.add_parser("retire-key", help="delete an old token key: its tokens stop being accepted", parents=[where])
    retire.add_argument("kid")
    arguments = parser.parse_args(argv)

    folder = auth_dir(_state_dir(arguments))
    if arguments.command != "issue-cert" and not folder.exists():
        print(f"no cluster auth folder at {folder}: run `make up` first, or pass --state-dir", file=sys.stderr)
        return 2
    try:
        if arguments.command == "mint":
            print(tokens.mint(folder, tokens.Role(arguments.role), arguments.subject, arguments.ttl_seconds))
        elif arguments.command == "issue-cert":
            paths = pki.CertificateAuthority(folder).issue(
                arguments.name, server=arguments.server,
                dns_names=tuple(arguments.dns) or pki.LOOPBACK_NAMES, ip_addresses=tuple(arguments.ip) or pki.LOOPBACK_ADDRESSES,
            )
            print(json.dumps({"ca_cert": str(folder / pki.CA_CERT_FILE), "cert": str(paths.cert), "key": str(paths.key)}, indent=2))
        elif arguments.command == "rotate-key":
            print(tokens.rotate_key(folder))
        else:
            tokens.retire_key(folder, arguments.kid)
    except (ValueError, errors.LedgerError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
