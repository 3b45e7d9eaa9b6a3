"""The extension backend's command runner and convergence, in-process (the commands only write files).

Each test drives an ExtensionBackend the way the daemon does (register, start, set_peers /
add_peer / remove_peer, reconcile) and reads what the commands recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from lab.wait import wait_for_async
from pyflanneld.backend import BackendContext, BackendError, ExternalInterface, backend_class
from pyflanneld.backend import extension as ext_mod
from pyflanneld.backend.extension import backend_data_text, lease_env, run_shell
from pyflanneld.config import parse_config
from pyflanneld.subnet.lease import Lease, LeaseAttrs


def make(tmp: Path, **backend) -> object:
    cfg = parse_config(json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "extension", **backend}}))
    ext = ExternalInterface(name="eth0", index=2, ip=IPv4Address("192.168.100.1"),
                            public_ip=IPv4Address("192.168.100.1"), mtu=1500)
    return backend_class("extension")(BackendContext(config=cfg, backend_config=cfg.backend, ext=ext, options=None))


def peer(n: int, data=None, btype="extension", ip: str | None = None) -> Lease:
    return Lease(IPv4Network(f"10.5.{n}.0/24"),
                 LeaseAttrs(IPv4Address(ip or f"192.168.100.{n}"), btype, data))


def own() -> Lease:
    return Lease(IPv4Network("10.5.1.0/24"), LeaseAttrs(IPv4Address("192.168.100.1"), "extension"))


def lines(p: Path) -> list[str]:
    return p.read_text().splitlines() if p.exists() else []


async def until(pred, what: str, timeout_s: float = 30) -> None:
    await wait_for_async(pred, timeout_s, what, 0.02)


def idle(be) -> bool:
    """No command worker is running or about to: what reconcile() started has finished."""
    return all(t.done() for t in be._workers.values())


def test_pure_helpers():
    assert backend_data_text(None) == "" and backend_data_text("aa:bb") == "aa:bb"
    assert backend_data_text({"VtepMAC": "x"}) is None and backend_data_text(5) is None
    assert lease_env(peer(3)) == {"SUBNET": "10.5.3.0/24", "PUBLIC_IP": "192.168.100.3"}


def test_bad_backend_config_is_upstreams_decode_error(tmp_path):
    with pytest.raises(BackendError, match="cannot unmarshal number into Go struct field .SubnetAddCommand of type string"):
        make(tmp_path, SubnetAddCommand=5)
    with pytest.raises(BackendError, match="CommandTimeout must be a positive number"):
        make(tmp_path, CommandTimeout="5")


def test_run_shell_env_stdin_status_and_timeout_kills_the_group(tmp_path):
    async def main():
        r = await run_shell('read X; echo "$X|$SUBNET"; echo oops >&2; exit 4', {"SUBNET": "10.5.2.0/24"}, "data", 5)
        assert (r.status, r.stdout, r.stderr.strip()) == (4, "data|10.5.2.0/24\n", "oops")
        assert r.problem() == "exit status 4: oops"
        marker = tmp_path / "child.pid"
        t0 = time.monotonic()
        r = await run_shell(f"sleep 600 & echo $! > {marker}; wait", {}, "", 0.5)
        assert r.status is None and r.problem() == "killed after 0.5s timeout"
        assert time.monotonic() - t0 < 300  # not after the 600 s of the command
        child = int(marker.read_text())
        await until(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2],
                    "the command's child killed with its group")
    asyncio.run(main())


def test_output_is_bounded_and_unread_stdin_is_fine(tmp_path):
    """A command printing without end (here 100 MB on each stream) costs no memory: only the first
    MAX_OUTPUT_BYTES of each are kept. Pre's output past that is refused: it would be BackendData."""
    cap = ext_mod.MAX_OUTPUT_BYTES

    async def main():
        r = await run_shell("head -c 100000000 /dev/zero | tr '\\0' a; head -c 100000000 /dev/zero >&2; exit 3",
                            {}, "", 60)
        assert (r.status, len(r.stdout), len(r.stderr), r.stdout_cut) == (3, cap, cap, True)
        assert r.problem().startswith("exit status 3: ") and len(r.problem()) < 600
        r = await run_shell("printf x", {}, "y" * 1_000_000, 10)  # never reads its 1 MB stdin
        assert (r.status, r.stdout, r.stdout_cut) == (0, "x", False)
        r = await run_shell(f"head -c {cap} /dev/zero | tr '\\0' b", {}, "", 10)
        assert (len(r.stdout), r.stdout_cut) == (cap, False)  # exactly the limit is whole
        with pytest.raises(BackendError, match=f"PreStartupCommand printed more than {cap} bytes"):
            await make(tmp_path, PreStartupCommand=f"head -c {cap + 1} /dev/zero | tr '\\0' c").register()
    asyncio.run(main())


def test_pre_output_is_backend_data_and_post_gets_own_lease(tmp_path):
    out = tmp_path / "post"
    be = make(tmp_path, PreStartupCommand="echo '  aa:bb:cc  '; echo noise >&2",
              PostStartupCommand=f'echo "$NETWORK $SUBNET $PUBLIC_IP" > {out}')

    async def main():
        info = await be.register()
        assert (info.backend_type, info.backend_data, info.mtu) == ("extension", "aa:bb:cc", 1500)
        await be.start(own())
        assert lines(out) == ["10.5.0.0/16 10.5.1.0/24 192.168.100.1"]
        # no Pre command: no BackendData at all (upstream omits the field)
        assert (await make(tmp_path).register()).backend_data is None
        # a failing startup command is one line naming it, its status and its stderr
        with pytest.raises(BackendError, match=r"PreStartupCommand failed \(exit status 7: nope\)"):
            await make(tmp_path, PreStartupCommand="echo nope >&2; exit 7").register()
    asyncio.run(main())


def test_peers_added_once_changed_removed_and_failures_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(ext_mod, "RETRY_MIN_S", 0.2)
    log = tmp_path / "log"
    allow = tmp_path / "allow"
    be = make(tmp_path,
              SubnetAddCommand=f'read D; [ "$PUBLIC_IP" != 192.168.100.4 ] || [ -e {allow} ] || {{ echo "not yet" >&2; exit 3; }}; '
                               f'echo "add $SUBNET $PUBLIC_IP $D" >> {log}',
              SubnetRemoveCommand=f'read D; echo "del $SUBNET $PUBLIC_IP $D" >> {log}')

    async def main():
        await be.register()
        await be.start(own())
        await be.set_peers([peer(2, "d2"), peer(3), peer(4, "d4"), peer(5, {"not": "a string"}), peer(6, btype="vxlan")])
        await until(lambda: len(lines(log)) == 2, "two adds")
        assert sorted(lines(log)) == ["add 10.5.2.0/24 192.168.100.2 d2", "add 10.5.3.0/24 192.168.100.3 "]
        await be.add_peer(peer(2, "d2"))  # a renewal: nothing runs again
        await be.reconcile()
        # h4's command fails; the reconcile loop retries it once the delay is over
        allow.touch()

        async def retried() -> None:
            while len(lines(log)) < 3:
                await be.reconcile()
                await asyncio.sleep(0.05)

        await asyncio.wait_for(retried(), 30)
        assert lines(log)[2] == "add 10.5.4.0/24 192.168.100.4 d4"
        # changed attributes: Remove with the old values, then Add with the new ones
        await be.add_peer(peer(2, "d2-new", ip="192.168.100.22"))
        await until(lambda: len(lines(log)) == 5, "the remove and add of the changed peer")
        assert lines(log)[3:] == ["del 10.5.2.0/24 192.168.100.2 d2", "add 10.5.2.0/24 192.168.100.22 d2-new"]
        await be.remove_peer(peer(3))
        await until(lambda: len(lines(log)) == 6, "the remove")
        assert lines(log)[5] == "del 10.5.3.0/24 192.168.100.3 "
        await be.reconcile()
        await until(lambda: idle(be), "the reconcile pass's workers done")
        assert len(lines(log)) == 6  # converged: nothing more runs
        await be.close()
    asyncio.run(main())


def test_a_hanging_command_does_not_hold_up_other_peers(tmp_path, monkeypatch):
    monkeypatch.setattr(ext_mod, "RETRY_MIN_S", 60)
    log = tmp_path / "log"
    # peer 2's command hangs until it is killed at the CommandTimeout (8 s: the others have time)
    be = make(tmp_path, CommandTimeout=8,
              SubnetAddCommand=f'[ "$PUBLIC_IP" = 192.168.100.2 ] && sleep 600; echo "$SUBNET" >> {log}')
    hung = IPv4Network("10.5.2.0/24")

    async def main():
        await be.register()
        await be.start(own())
        await be.set_peers([peer(2), *(peer(n) for n in range(3, 23))])
        # the event path never waits for a command: not even the fast ones have run yet
        assert lines(log) == [] and hung not in be._retry
        await until(lambda: len(lines(log)) == 20, "the 20 other peers added")
        # ... all 20 done while peer 2's command still hangs (not killed yet, no retry planned)
        assert hung not in be._retry and not be._workers[hung].done()
        await until(lambda: hung in be._retry, "the hanging command killed at its timeout, a retry planned")
        assert str(hung) not in lines(log)
        await be.close()
    asyncio.run(main())


def test_failing_remove_is_given_up_after_five_attempts(tmp_path, monkeypatch):
    monkeypatch.setattr(ext_mod, "RETRY_MIN_S", 0.01)
    monkeypatch.setattr(ext_mod, "RETRY_MAX_S", 0.01)
    count = tmp_path / "count"
    be = make(tmp_path, SubnetAddCommand="true", SubnetRemoveCommand=f"echo x >> {count}; exit 1")

    async def main():
        await be.register()
        await be.start(own())
        await be.set_peers([peer(2)])
        await until(lambda: IPv4Network("10.5.2.0/24") in be._added, "the add")
        await be.set_peers([])

        async def given_up() -> None:
            while be._added:
                await be.reconcile()
                await asyncio.sleep(0.02)

        await asyncio.wait_for(given_up(), 30)
        for _ in range(10):  # given up: further reconciles run nothing
            await be.reconcile()
            await until(lambda: idle(be), "the reconcile pass's workers done")
        assert len(lines(count)) == 5 and not be._added and not be._retry
        await be.close()
    asyncio.run(main())


def test_env_is_flanneld_env_plus_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBNET", "overridden")
    monkeypatch.setenv("FROM_FLANNELD", "yes")
    out = tmp_path / "env"
    be = make(tmp_path, SubnetAddCommand=f'echo "$SUBNET $FROM_FLANNELD" > {out}')

    async def main():
        await be.register()
        await be.start(own())
        await be.add_peer(peer(9))
        await until(out.exists, "the command's output")
        await be.close()
    asyncio.run(main())
    assert lines(out) == ["10.5.9.0/24 yes"]
    assert os.environ["SUBNET"] == "overridden"
