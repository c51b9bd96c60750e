"""Backend test packages: a package each, so that test modules of different
backends (and tests/adapters) may share basenames such as test_errors.py."""
