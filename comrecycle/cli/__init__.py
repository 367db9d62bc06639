"""The `comrecycle` command line (one package: main.py dispatches; sim, models, policy and serving
hold the commands of each area). `comrecycle --help` lists them."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
