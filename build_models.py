#!/usr/bin/env python3
"""Build the ComRecycle model set and generate the Triton model repository (see --help)."""
import sys

from comrecycle.cli.build import main

if __name__ == "__main__":
    sys.exit(main())
