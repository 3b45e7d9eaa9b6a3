"""The scenarios this machine's kernel cannot run (wireguard, ipip, ipsec), under Debian's kernel.

One qemu VM (lab/vm.py: Debian's kernel, this machine's filesystem shared in) is booted for the
whole module; inside it the VM's pytest runs every scenario in ``tests/vm/`` with the same
namespace lab, real etcd and real daemons (pyflanneld and the upstream binary). Each scenario is
one test here that reports its outcome from the VM's JUnit report, with its captured output and
the daemons' logs on failure; a scenario skipped in the VM (upstream binary absent) is skipped
here with the same reason. All of them run in one xdist group, beside the rest of the suite.
"""

from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import ROOT, vm
from lab.upstream import upstream_binary

pytestmark = [pytest.mark.lab, pytest.mark.xdist_group("vm")]

VM_TESTS = Path(__file__).parent / "vm"
VM_TIMEOUT_S = 1800  # the whole in-VM run; typically a few minutes under emulation


def scenarios() -> list[str]:
    """``file::function`` of every top-level ``test_*`` function in tests/vm (read, not imported)."""
    out = []
    for path in sorted(VM_TESTS.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                out.append(f"{path.name}::{node.name}")
    return out


@dataclass
class Case:
    outcome: str  # "passed" | "failed" | "error" | "skipped"
    message: str
    text: str  # failure text, captured output and logs


@dataclass
class VMRun:
    result: vm.VMResult
    cases: dict[str, list[Case]]  # "file::function" → its cases (several if parametrized)


def _parse_junit(path: Path) -> dict[str, list[Case]]:
    cases: dict[str, list[Case]] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        module = tc.get("classname", "").rsplit(".", 1)[-1]
        name = tc.get("name", "").split("[", 1)[0]
        outcome, message, parts = "passed", "", []
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = child.get("message", "")
                parts.append(child.text or "")
            elif child.tag in ("system-out", "system-err"):
                parts.append(f"--- {child.tag} ---\n{child.text or ''}")
        if outcome == "skipped" and any(c.tag == "error" for c in tc):
            outcome = "error"
        cases.setdefault(f"{module}.py::{name}", []).append(Case(outcome, message, "\n".join(parts)))
    return cases


@pytest.fixture(scope="module")
def vm_run(tmp_path_factory: pytest.TempPathFactory) -> VMRun:
    upstream_binary("v0.20.2")  # decompressed here, into the cache the VM sees through the shared root
    scratch = tmp_path_factory.mktemp("vm")
    junit = scratch / "junit.xml"
    res = vm.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "junit_logging=all",
                  "-o", "junit_family=xunit1", f"--junitxml={junit}", "-vv", str(VM_TESTS)],
                 scratch=scratch, cwd=ROOT, timeout_s=VM_TIMEOUT_S,
                 env={vm.GUEST_ENV: "1"})
    print(f"VM run: {res.seconds:.1f} s, pytest exit status {res.returncode}")
    cases = _parse_junit(junit) if junit.exists() else {}
    return VMRun(res, cases)


@pytest.mark.timeout(VM_TIMEOUT_S + 300)
@pytest.mark.parametrize("scenario", scenarios())
def test_in_vm(vm_run: VMRun, scenario: str) -> None:
    res = vm_run.result
    assert res.returncode is not None, f"the VM run did not finish (boot failure, panic or timeout)\n{res.tail()}"
    cases = vm_run.cases.get(scenario)
    assert cases, f"{scenario} did not run in the VM (pytest exit status {res.returncode})\n{res.tail()}"
    bad = [c for c in cases if c.outcome in ("failed", "error")]
    assert not bad, f"{scenario} {bad[0].outcome} in the VM: {bad[0].message}\n{bad[0].text[-12000:]}"
    skipped = [c for c in cases if c.outcome == "skipped"]
    if skipped and len(skipped) == len(cases):
        pytest.skip(skipped[0].message)


def test_scenarios_found() -> None:
    """The list above is read from the sources: an empty one would make this module pass vacuously."""
    names = scenarios()
    assert any("wireguard" in n for n in names) and any("ipip" in n for n in names), names
