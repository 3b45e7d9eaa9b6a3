"""Shared pytest setup: the `lab` marker, lab/etcd fixtures and a namespace-leak guard.

Fixtures:
    lab   -- a fresh lab.netns.Lab (switch namespace with br0 192.168.100.254/24),
             closed after the test; logs of a failed test are printed at teardown.
    etcd  -- an EtcdServer (v2 enabled) in the lab's switch namespace, healthy, = lab.etcd.
Tests using either fixture are marked `lab` automatically (run only them: -m lab).
After the session each (xdist) worker asserts that none of the namespaces it created remain.

``tests/vm/`` holds scenarios that need Debian's kernel: they run inside the lab VM (lab/vm.py),
started by ``tests/test_vm.py``, and are not collected on this machine.
"""

from __future__ import annotations

import os

import pytest

from lab import netns
from lab.vm import GUEST_ENV

collect_ignore = [] if os.environ.get(GUEST_ENV) else ["vm"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs root, network namespaces and/or a real etcd")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"lab", "etcd"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _dump_logs(lab: netns.Lab) -> None:
    for path in sorted(lab.tmp.rglob("*.log")):
        text = path.read_text(errors="replace")
        print(f"----- {path.relative_to(lab.tmp)} (last 4000 chars) -----")
        print(text[-4000:])


@pytest.fixture
def lab(request: pytest.FixtureRequest):
    the_lab = netns.Lab()
    try:
        yield the_lab
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            _dump_logs(the_lab)
        the_lab.close()
    left = set(the_lab._namespaces) & netns.existing_namespaces()
    assert not left, f"lab.close() left namespaces behind: {sorted(left)}"


@pytest.fixture
def etcd(lab: netns.Lab):
    return lab.start_etcd(enable_v2=True)


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_namespaces():
    yield
    netns.close_all_labs()
    left = sorted(set(netns.created_namespaces()) & netns.existing_namespaces())
    if left:
        netns.purge_namespaces(left)
        raise AssertionError(f"test session left network namespaces behind (now deleted): {left}")
