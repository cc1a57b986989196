"""The engine: loading, the training step, tracing, measuring, fitting.

Imports only the leaf modules (errors, units, results) and itself.
"""
