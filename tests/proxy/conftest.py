"""Registers the ``proxy`` marker for a whole-suite run until pyproject.toml lists it (pytest
runs with --strict-markers). Running tests/test_real_proxy.py alone still needs the pyproject
entry, or ``-o markers=proxy``."""


def pytest_configure(config):
    config.addinivalue_line("markers", "proxy: runs the bot against the real LiteLLM proxy (requirements-proxy.lock)")
