"""Runnable examples of user code that dni_dist trains (imported by the tests too)."""
