"""The dfagent exception tree.

dfagent builds on nydusfs, so its errors are :class:`~nydusfs.errors.NydusfsError` too: one
``except NydusfsError`` in a CLI turns any of them into one line. Configuration errors are
nydusfs's own :class:`~nydusfs.errors.ConfigError` (the config loaders share nydusfs's value
helpers), re-exported here. Foreign exceptions (aiohttp, redis, OSError) are translated where the
library is called::

    NydusfsError
    ├── ConfigError                a config value is invalid; the message names the field
    └── DfagentError
        ├── RequestError           a request to the supernode is malformed (HTTP 400); the
        │                          message names the field, e.g. ``digests[3]: ...``
        ├── StoreError             the peer store failed (a bug or corrupt shared state)
        │   └── StoreUnavailable   the peer store cannot be reached now (Redis down): HTTP 503
        ├── FetchError             the peer agent could not get a chunk from any peer or its
        │                          source (the message says what the source answered)
        ├── AgentError             ``dfagent get``/``preheat``: the local agent is unreachable
        │                          or refused the request
        └── SupernodeError         the client side: a supernode call did not succeed
            ├── SupernodeUnavailable  no supernode answered in time: fall back to the source
            └── SupernodeRejected     a supernode answered with a refusal (4xx): retrying
                │                     elsewhere would not help
                ├── Unauthorized      401: the cluster token is missing or wrong
                └── UnknownPeer       404: the supernode does not know (or has expired) this
                                      peer; register again, then re-announce

*Unavailable* (transient, try later, meanwhile go to the source) is kept apart from *rejected*
(our request is wrong, or we must re-register first): callers react differently to each.
"""

from __future__ import annotations

from nydusfs.errors import ConfigError, NydusfsError

__all__ = [
    "AgentError",
    "ConfigError",
    "DfagentError",
    "FetchError",
    "RequestError",
    "StoreError",
    "StoreUnavailable",
    "SupernodeError",
    "SupernodeRejected",
    "SupernodeUnavailable",
    "Unauthorized",
    "UnknownPeer",
]


class DfagentError(NydusfsError):
    """Base of every error dfagent raises deliberately."""


class RequestError(DfagentError):
    """A supernode request body or parameter is invalid; the message starts with the field."""


class StoreError(DfagentError):
    """The peer store failed in a way retrying will not fix."""


class StoreUnavailable(StoreError):
    """The peer store cannot be reached (Redis down or timing out); try again later."""


class FetchError(DfagentError):
    """A chunk could not be had: no peer delivered it and the source failed.

    ``code`` is ``not_found`` (the source does not have it: final), ``unavailable`` (transient:
    retry later), ``integrity`` (the source's bytes do not match the digest) or ``bad_request``.
    """

    def __init__(self, message: str, *, code: str = "unavailable") -> None:
        super().__init__(message)
        self.code = code


class AgentError(DfagentError):
    """The local peer agent (its Unix socket) is unreachable or refused a request."""


class SupernodeError(DfagentError):
    """A call to the supernode(s) did not succeed."""


class SupernodeUnavailable(SupernodeError):
    """No supernode answered in time (all down, slow, or failing with 5xx).

    The P2P layer is an optimisation: on this error a peer fetches from the source instead.
    """


class SupernodeRejected(SupernodeError):
    """A supernode answered and refused the request (HTTP 4xx, other than 401 and 404).

    ``status`` is the HTTP status, ``code`` the machine-readable error code from the body
    (``bad_request``, ``payload_too_large``, ...).
    """

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Unauthorized(SupernodeRejected):
    """HTTP 401: the cluster token is missing or does not match the supernode's."""


class UnknownPeer(SupernodeRejected):
    """HTTP 404 ``unknown_peer``: the peer is not registered (never was, left, or expired).

    The peer should register again (with ``reset=True``) and re-announce its chunks.
    """
