"""The open MagicLens data engine: mine, instruct, train, evaluate and search."""

from magiclens.version import __version__

__all__ = ["__version__"]
