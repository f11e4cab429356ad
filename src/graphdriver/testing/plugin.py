"""pytest plugin of the conformance suite: fixtures and skip helpers.

Enable with ``pytest_plugins = ["graphdriver.testing.plugin"]``. (Filled in by the suite.)
"""
