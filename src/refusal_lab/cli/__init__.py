"""The refusal-lab command line."""

from refusal_lab.cli.app import main

__all__ = ["main"]
