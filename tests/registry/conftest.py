"""Fixtures of the registry tests: the real ``docker-registry`` server, a fault proxy, stores, images.

The registry is Debian's ``docker-registry`` (the distribution project's server) on 127.0.0.1,
one per test module (tests use distinct repositories); every test that needs faults gets its own
:class:`~graphdriver.testing.registry_server.FaultProxy` in front of it. Helpers reach the test
modules through the ``kit`` fixture (``--import-mode=importlib``: conftest cannot be imported).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import select
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from graphdriver.layers.store import LayerStore
from graphdriver.registry.client import RetryPolicy
from graphdriver.testing.registry_server import (
    FaultProxy,
    RegistryServer,
    registry_server,
    registry_unavailable_reason,
)
from graphdriver.testing.storestate import driver_unsupported
from graphdriver.testing.trees import Entry, snapshot_tree

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, max_retry_after=2.0)



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = registry_unavailable_reason()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _no_user_credentials(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials come only from what a test writes: never from this machine's config files."""
    empty = tmp_path_factory.mktemp("docker-config")
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with registry_server(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


@dataclass
class BuiltImage:
    config: bytes
    layers: list[str]
    diff_ids: list[str]
    chain_ids: list[str]


_repos = itertools.count()


class Kit:
    """Helpers for the registry tests."""

    def __init__(self, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp = tmp_path
        self._factory = tmp_path_factory
        self._stores: list[LayerStore] = []

    @staticmethod
    def events_until(proc: subprocess.Popen[bytes], done: Any) -> list[dict[str, Any]]:
        """The JSON progress events a ``pull`` subprocess prints (``--json``/JsonLines sink),
        read until ``done(events)`` holds; fails when the process goes quiet for 2 minutes or
        ends first."""
        assert proc.stdout is not None
        seen: list[dict[str, Any]] = []
        buf = b""
        while not done(seen):
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, f"no progress from the pull; events so far: {seen}"
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"the pull ended early ({proc.wait()}); events: {seen}"
            buf += chunk
            *lines, buf = buf.split(b"\n")
            seen.extend(json.loads(line) for line in lines if line)
        return seen

    def repo(self, prefix: str = "t") -> str:
        """A repository name no other test of the session uses."""
        return f"{prefix}/r{os.getpid()}-{next(_repos)}"

    def store(self, name: str, driver: str = "vfs") -> LayerStore:
        """The store ``name`` of this test (opened on first use)."""
        for s in self._stores:
            if s.root == self.tmp / name:
                return s
        reason = driver_unsupported(driver, self._factory.getbasetemp())
        if reason is not None:
            pytest.skip(f"driver {driver} does not work here: {reason}")
        store = LayerStore.open(self.tmp / name, driver)
        self._stores.append(store)
        return store

    def reopen(self, store: LayerStore) -> LayerStore:
        store.close()
        again = LayerStore.open(store.root, store.driver.name)
        self._stores.append(again)
        return again

    def image(self, store: LayerStore, blobs: Sequence[bytes], *, os_arch: str = "linux/amd64") -> BuiltImage:
        """Import layer blobs (bottom first) and make the config that lists them."""
        parent = None
        layers = []
        for blob in blobs:
            layer = store.import_layer(io.BytesIO(blob), parent)
            layers.append(layer)
            parent = layer.id
        osname, arch = os_arch.split("/")[:2]
        config = json.dumps(
            {
                "architecture": arch,
                "os": osname,
                "config": {"Env": ["PATH=/usr/bin:/bin"]},
                "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
                "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
            },
            separators=(",", ":"),
        ).encode()
        return BuiltImage(
            config,
            [la.id for la in layers],
            [str(la.diff_id) for la in layers],
            [str(la.chain_id) for la in layers],
        )

    def rootfs(self, store: LayerStore, layer: str) -> dict[str, Entry]:
        """The exact tree of ``layer`` with everything below it."""
        with store.mounted(layer) as root:
            return snapshot_tree(root)

    def close(self) -> None:
        for s in self._stores:
            try:
                s.close()
            except Exception:
                pass


@pytest.fixture
def kit(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    k = Kit(tmp_path, tmp_path_factory)
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``graphdriver.cli.main.main`` with ``pull``/``push`` registered (a no-op once main.py
    registers them itself)."""
    import importlib

    from graphdriver.cli import registry_commands

    m = importlib.import_module("graphdriver.cli.main")

    original = m.build_parser

    def build() -> Any:
        parser = original()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and "pull" not in action.choices:
                registry_commands.register(action, m._command)
        return parser

    monkeypatch.setattr(m, "build_parser", build)
    return m.main
