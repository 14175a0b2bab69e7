"""The `mechscope` command line."""
