"""How a client reaches corebank: TLS with a client certificate, and a bearer token per call.

    channel = client.channel(cluster)                      # admin, from cluster.json's "auth"
    channel = client.channel(cluster, token=some_token)    # any identity
    channel = client.channel(cluster, aio=True)            # grpc.aio
    target = client.Target.of_cluster(cluster)             # picklable: address, certificate paths, token

`cluster` is cluster.json's content (its "grpc_endpoint" and "auth").
"""

from __future__ import annotations

import collections
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


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION_METADATA, f"Bearer {token}"),)


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every unary call of a channel, in the calling thread.

    Not grpc.access_token_call_credentials: that is a Python metadata plugin that gRPC calls on a
    thread of its own for every call, which costs a thread hop per call and stalls under gevent
    (locust: calls never left the client and timed out)."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        details = _CallDetails(
            client_call_details.method, client_call_details.timeout, (*(client_call_details.metadata or ()), *self._metadata),
            client_call_details.credentials, client_call_details.wait_for_ready, client_call_details.compression,
        )
        return continuation(details, request)


class AioBearerToken(grpc.aio.UnaryUnaryClientInterceptor):
    """BearerToken for grpc.aio channels."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        details = grpc.aio.ClientCallDetails(
            client_call_details.method, client_call_details.timeout, (*(client_call_details.metadata or ()), *self._metadata),
            client_call_details.credentials, client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


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
        """The channel's transport: TLS with the client certificate (the token rides on each call)."""
        return ClientTls.from_paths(self.ca_cert, self.client_cert, self.client_key).credentials()

    def channel(self, *, aio: bool = False, options: list | tuple = ()):
        """A channel whose every unary call carries the token (none when token is None)."""
        if aio:
            interceptors = [] if self.token is None else [AioBearerToken(self.token)]
            return grpc.aio.secure_channel(self.address, self.credentials(), options=list(options), interceptors=interceptors)
        channel = grpc.secure_channel(self.address, self.credentials(), options=list(options))
        return channel if self.token is None else grpc.intercept_channel(channel, BearerToken(self.token))


def channel(cluster: dict, token: str | None = "", *, aio: bool = False, options: list | tuple = (), address: str | None = None):
    """A channel to the cluster; token "" means cluster.json's admin token, None no token."""
    return Target.of_cluster(cluster, token, address).channel(aio=aio, options=options)
