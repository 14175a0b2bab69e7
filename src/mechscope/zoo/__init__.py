"""Bundled model organisms with planted mechanisms, and the tools that build them."""
