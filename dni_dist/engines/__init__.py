"""Engines drive stages: ``local`` (one process, lockstep: the reference semantics) and the
Ray engine (one actor per stage, running the stage loop over a transport)."""
