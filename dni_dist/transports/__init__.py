"""Transports move stage messages between processes: one small interface, several wires."""

from dni_dist.transports.base import Stream, Transport, TransportError, TransportTimeout

__all__ = ["Stream", "Transport", "TransportError", "TransportTimeout"]
