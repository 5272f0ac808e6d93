"""Transports move stage messages between processes: one small interface, several wires.

They may import ``core`` (messages and streams), ``wire`` (the gRPC format) and ``errors``;
nothing above (config, engines, operations) and nothing of the stage's math."""

from dni_dist.transports.base import Stream, Transport, TransportError, TransportTimeout

__all__ = ["Stream", "Transport", "TransportError", "TransportTimeout"]
