"""Offline fixtures for tests and tiny twins: small random models and tokenizers built in-process, no files."""
