"""Importing this module registers every command on the root app (one module per command group)."""

from refusal_lab.cli import attack, evaluate, export, harden, label, model, organism, prove, search  # noqa: F401
