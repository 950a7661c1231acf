"""autodidact: language models write their own training data, and filter it."""

__version__ = "0.1.0"
