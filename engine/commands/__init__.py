"""One module per ``agg2exp`` command; each exposes ``register(subparsers)``."""
