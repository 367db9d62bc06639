"""ComRecycle: computation recycling for cascade recommenders served by Triton."""

__version__ = "0.1.0"
