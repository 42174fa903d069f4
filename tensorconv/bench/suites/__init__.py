"""The suites of ``tensorconv bench``: one module each, ``run(args, targets) -> rows``."""
