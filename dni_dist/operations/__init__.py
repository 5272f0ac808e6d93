"""Running a job well: Prometheus metrics, the live monitor and progress display,
checkpoints and restarts, and the pre-flight check of a config.

This layer sits above the engines and below the surfaces (``runner``, ``cli``): it may
import ``core``, ``models``, ``data``, ``transports``, ``config``, ``builder`` and
``errors``, never ``engines`` (the runner hands it what an engine exposes), ``runner``,
``cli``, ``bench`` or ``reproduce``.
"""
