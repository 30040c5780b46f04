"""The real LiteLLM proxy for tests/test_real_proxy.py: see harness.py."""
