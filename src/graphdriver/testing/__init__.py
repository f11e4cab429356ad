"""The conformance suite every driver passes, shipped in the package.

Use it from an out-of-tree driver's tests by enabling the plugin and subclassing the suite::

    # conftest.py
    pytest_plugins = ["graphdriver.testing.plugin"]

    # test_mydriver.py
    from graphdriver.testing.suite import DriverConformance

    class TestMyDriver(DriverConformance):
        driver_name = "mydriver"

The cases that run are chosen from the driver's :class:`~graphdriver.drivers.base.Capabilities`.
:mod:`graphdriver.testing.sandbox` provides the read-only mount namespace the suite uses as root.
"""
