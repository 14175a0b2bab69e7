"""Re-export of :mod:`mechscope.results` (``Result`` moved to the ground floor, where every layer can use it)."""

from mechscope.results import FORMAT, SCHEMA_VERSION, Result

__all__ = ["FORMAT", "SCHEMA_VERSION", "Result"]
