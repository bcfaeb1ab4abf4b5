"""How a client reaches corebank: TLS with a client certificate, and a bearer token per call.

    channel = client.channel(cluster)                      # admin, from cluster.json's "auth"
    channel = client.channel(cluster, token=some_token)    # any identity
    channel = client.channel(cluster, aio=True)            # grpc.aio
    target = client.Target.of_cluster(cluster)             # picklable: address, certificate paths, token

`cluster` is cluster.json's content (its "grpc_endpoint" and "auth").
"""

from __future__ import annotations

import dataclasses
import pathlib

import grpc

AUTHORIZATION_METADATA = "authorization"


@dataclasses.dataclass(frozen=True)
class ClientTls:
    ca_cert: bytes
    client_cert: bytes
    client_key: bytes

    @classmethod
    def from_paths(cls, ca_cert: str | pathlib.Path, client_cert: str | pathlib.Path, client_key: str | pathlib.Path) -> ClientTls:
        return cls(pathlib.Path(ca_cert).read_bytes(), pathlib.Path(client_cert).read_bytes(), pathlib.Path(client_key).read_bytes())

    @classmethod
    def of_cluster(cls, cluster: dict) -> ClientTls:
        auth = cluster["auth"]
        return cls.from_paths(auth["ca_cert"], auth["client_cert"], auth["client_key"])

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert, private_key=self.client_key, certificate_chain=self.client_cert
        )


def credentials(tls: ClientTls, token: str | None) -> grpc.ChannelCredentials:
    """TLS with the client certificate, plus `authorization: Bearer <token>` on every call when a token is given."""
    channel_credentials = tls.credentials()
    if token is None:
        return channel_credentials
    return grpc.composite_channel_credentials(channel_credentials, grpc.access_token_call_credentials(token))


@dataclasses.dataclass(frozen=True)
class Target:
    """Where and as whom to call corebank. Plain strings, so it pickles (load generator processes get one)."""

    address: str
    ca_cert: str
    client_cert: str
    client_key: str
    token: str | None = dataclasses.field(repr=False)

    @classmethod
    def of_cluster(cls, cluster: dict, token: str | None = "", address: str | None = None) -> Target:
        """The cluster's gRPC endpoint; token "" means cluster.json's admin token, None no token."""
        auth = cluster["auth"]
        return cls(
            address or cluster["grpc_endpoint"], auth["ca_cert"], auth["client_cert"], auth["client_key"],
            auth["admin_token"] if token == "" else token,
        )

    def acting_as(self, token: str | None) -> Target:
        return dataclasses.replace(self, token=token)

    def credentials(self) -> grpc.ChannelCredentials:
        return credentials(ClientTls.from_paths(self.ca_cert, self.client_cert, self.client_key), self.token)

    def channel(self, *, aio: bool = False, options: list | tuple = ()):
        if aio:
            return grpc.aio.secure_channel(self.address, self.credentials(), options=list(options))
        return grpc.secure_channel(self.address, self.credentials(), options=list(options))


def channel(cluster: dict, token: str | None = "", *, aio: bool = False, options: list | tuple = (), address: str | None = None):
    """A channel to the cluster; token "" means cluster.json's admin token, None no token."""
    return Target.of_cluster(cluster, token, address).channel(aio=aio, options=options)
