"""A Ray cluster's address: checked in seconds before ray.init, which would retry for 20 s or more."""

from __future__ import annotations

import os
import socket

_GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # cheap, and present in every Ray 2.x GCS


class RayUnreachable(RuntimeError):
    """No Ray cluster answers at the address given."""


def in_ray_job() -> bool:
    """True in the entrypoint of `ray job submit`, whose working directory is a temporary copy."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with the reason, where ray.init would retry for 20 s or more.

    A TCP connect is not proof (proxies and load balancers accept anything), so this makes
    one real call to the GCS; refusing it for want of a token still proves a Ray cluster.
    """
    import grpc

    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise RayUnreachable(f"{address} is the dashboard's job address, for `ray job submit --address`; "
                           "`--address` takes the cluster's GCS address, HEAD:6379")
    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayUnreachable(f"Ray address {address!r} must be HOST:PORT (e.g. 10.0.0.1:6379)")
    if client:  # Ray Client's proxy speaks another protocol; a connect is all we can check cheaply
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
            return
        except OSError as e:
            raise RayUnreachable(f"cannot reach Ray Client at {address}: {e.strerror or e}") from None
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        get_cluster_id = channel.unary_unary(_GCS_PROBE, request_serializer=bytes, response_deserializer=bytes)
        try:
            get_cluster_id(b"", timeout=timeout_s)
            return
        except grpc.RpcError as e:
            code = e.code()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return
    reason = {grpc.StatusCode.UNAVAILABLE: "nothing answers there",
              grpc.StatusCode.DEADLINE_EXCEEDED: f"no answer within {timeout_s:g} s"}.get(
        code, f"something answers, but it is not a Ray GCS ({code.name})")
    raise RayUnreachable(f"cannot reach a Ray cluster at {address}: {reason} (is `ray start --head` running there, "
                       "and is its port, 6379 by default, open?)")
