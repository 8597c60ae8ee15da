"""Contracts shared by every fraudstream service: topic names, event schemas, settings, and
the embedded broker used for local runs and tests."""

__version__ = "0.1.0"
