"""Engines drive stages: ``local`` (one process, lockstep: the reference semantics) and the
Ray engine (one actor per stage, running the stage loop over a transport). ``shards``: a
stage's checkpoint file, which both engines write and read where the state lives.

Above ``core``, ``models``, ``data``, ``transports``, ``config`` and ``builder``, which they may
import; never ``operations``, ``runner``, ``cli``, ``bench`` or ``reproduce`` (the runner
drives an engine, not the other way round)."""
