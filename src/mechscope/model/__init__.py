"""Hooked HF models: adapters, hook sessions, activation caches and weight views."""
