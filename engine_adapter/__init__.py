"""The layered-prefill serving engine: scheduler, executors, cost model and server."""

from engine_adapter.compiled import guard

guard()  # (before any compiled module is imported)
