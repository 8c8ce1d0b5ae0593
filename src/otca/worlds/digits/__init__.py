"""The embedded default world: text-to-image on scikit-learn's bundled handwritten digits at 16x16.

Its registrations (model kind, prompt set, eval suite, rewards) live in :mod:`otca.worlds.digits.register`,
the module its ``otca.worlds`` entry point names.
"""
