"""Errors of the transport layer, shared by the interface and the wire checks."""


class TransportError(RuntimeError):
    """A peer or the wire failed; the message says which stream."""


class TransportTimeout(TransportError):
    """Nothing arrived within the timeout."""
