"""Registry of methods, as data: the CLI and the dashboard read ``METHODS``."""
