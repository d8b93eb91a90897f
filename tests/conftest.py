"""Suite-wide plugins: native-model tests run in child processes (see tests/native_isolation.py)."""

pytest_plugins = ["tests.native_isolation"]
