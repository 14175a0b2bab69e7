"""Prompt sets and contrast pairs that methods and workflows share (no model code here)."""
