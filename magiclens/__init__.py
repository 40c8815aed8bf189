"""The open MagicLens data engine: mine, instruct, train, evaluate and search."""

__version__ = "0.1.0"
