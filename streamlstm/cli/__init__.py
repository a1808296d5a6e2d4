"""The ``streamlstm`` command line."""

from streamlstm.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
