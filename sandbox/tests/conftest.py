"""Fixtures shared by the sandbox's test modules: each module gets its own server (module scope)."""

from sandbox.tests.test_sandbox import prices, receiver, sandbox, store

__all__ = ["prices", "receiver", "sandbox", "store"]
