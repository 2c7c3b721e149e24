"""flashsale: a flash-sale checkout and reservation service."""

__version__ = "0.1.0"
