"""Turn a failed call's gRPC status into an error a person can act on.

gRPC reports every failed connection as ``UNAVAILABLE`` with a free-text ``details``. When a
TLS handshake failed, that text says why from the client's side (the node's certificate is
signed by another CA, or is not valid for the expected node name); when the *node* rejected
this client's certificate, the client only sees the socket close. This module recognises
those cases and names the problem, keeping gRPC's own text at the end for the record.
"""

from __future__ import annotations

import grpc

from federation import pki
from federation.errors import (
    FederationError,
    InvalidRequestError,
    NodeUnavailableError,
    error_from_status,
)

__all__ = ["error_for_status"]


def error_for_status(
    code: grpc.StatusCode,
    details: str,
    *,
    node: str,
    address: str,
    identity: pki.Identity | None,
    refusal: str = "",
) -> FederationError:
    """Return the exception for a failed call to ``node``, diagnosing TLS failures.

    Args:
        code: the call's status code.
        details: the call's status details.
        node: the node's name (the name its certificate must carry).
        address: the ``host:port`` dialled.
        identity: this client's TLS identity; None for a plaintext channel.
        refusal: the call's ``federation-refusal`` trailing metadata ("" if none).

    Returns:
        A ``NodeUnavailableError`` naming the handshake problem when one is recognised,
        otherwise what :func:`federation.errors.error_from_status` returns.
    """
    if code is grpc.StatusCode.UNAVAILABLE:
        where = f"node {node!r} at {address}"
        problem = _connection_problem(details, where=where, node=node, identity=identity)
        if problem is not None:
            return NodeUnavailableError(f"{problem} (gRPC: {details})")
    if code is grpc.StatusCode.CANCELLED:
        return NodeUnavailableError(
            f"node {node!r} cancelled the call before answering: a node cuts off requests "
            f"that run past its max_request_s, and open calls when it shuts down ({details})"
        )
    return error_from_status(code, details, node=node, refusal=refusal)


def _connection_problem(
    details: str, *, where: str, node: str, identity: pki.Identity | None
) -> str | None:
    """Name what went wrong while connecting, or None if it does not look like TLS."""
    text = details.lower()
    if "hostname verification" in text or "no match found for server name" in text:
        return (
            f"TLS handshake with {where} failed: the node's certificate is not valid for the "
            f"name {node!r}. The address may belong to another node, or the certificate "
            f"lacks DNS:{node} (issue it with `federation certs issue --name {node} "
            "--role node`)"
        )
    if "certificate has expired" in text:
        return (
            f"TLS handshake with {where} failed: the node's certificate has expired; its "
            "operator must issue a new one"
        )
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return (
            f"TLS handshake with {where} failed: the node's certificate is not signed by the "
            "CA this coordinator trusts (tls.ca). Both sides must use the same federation CA"
        )
    own = _own_certificate_problem(identity)
    if own is not None and "failed to connect" in text:
        return f"TLS handshake with {where} failed: " + own
    if "failed to connect" in text and ("socket closed" in text or "connection reset" in text):
        if identity is None:
            return (
                f"{where} closed the connection of this plaintext client: a node that "
                "requires TLS only talks to clients with a certificate; add a [tls] section "
                "(ca, cert, key) to the coordinator config"
            )
        return (
            f"TLS handshake with {where} failed: the node closed the connection, which is "
            "how a node refuses a client certificate it does not accept (signed by another "
            "CA, expired or not yet valid). Check that tls.cert was issued by the node's "
            "federation CA"
        )
    if "handshake" in text or "ssl" in text or "tls" in text:
        return f"TLS handshake with {where} failed"
    return None


def _own_certificate_problem(identity: pki.Identity | None) -> str | None:
    """Say what is wrong with this client's own certificate dates, if anything."""
    if identity is None:
        return None
    try:
        pki.check_validity(identity.cert_pem)
    except InvalidRequestError as err:
        return f"this client's {err}"
    return None
