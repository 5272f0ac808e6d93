"""Engines drive stages: ``local`` (one process, lockstep, the reference semantics)."""
