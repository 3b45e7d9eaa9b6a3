"""ipip on this machine: options, a foreign device of its name, and the one-line failure on this
kernel, which has no ipip device type. The data path (mixed cluster with upstream, DirectRouting
across underlay subnets, repair) runs under Debian's kernel: tests/vm/test_ipip.py via
tests/test_vm.py."""

from __future__ import annotations

import json

import pytest
from backend_harness import BackendProc, DriverError

from lab import start_daemon

NET = {"Network": "10.5.0.0/16", "Backend": {"Type": "ipip"}}


def register_error(lab, backend: dict) -> DriverError:
    h = lab.hosts.get("h1") or lab.add_host("h1")
    p = BackendProc(h, {**NET, "Backend": {"Type": "ipip", **backend}}, log_dir=lab.tmp)
    with pytest.raises(DriverError) as ei:
        p.call("register")
    p.close()
    return ei.value


def test_bad_option_type_is_upstreams_decode_error(lab):
    e = register_error(lab, {"DirectRouting": "yes"})
    assert (str(e), e.type) == ("error decoding IPIP backend config: json: cannot unmarshal string into Go "
                                "struct field .DirectRouting of type bool", "BackendError")


def test_foreign_device_of_that_name_is_left_alone(lab):
    h = lab.add_host("h1")
    h.ip("link", "add", "flannel.ipip", "type", "veth", "peer", "name", "x0")
    e = register_error(lab, {})
    assert str(e) == "flannel.ipip isn't an ipip mode device, please remove device and try again"
    assert h.link_exists("flannel.ipip")


def test_this_kernel_lacks_ipip_one_line(lab):
    e = register_error(lab, {"DirectRouting": True})
    assert str(e) == ("create ipip device flannel.ipip: the kernel has no ipip device type (Operation not "
                      "supported): load the ipip module (modprobe ipip) or choose another backend (e.g. host-gw, "
                      "udp)"), "this test expects the machine's kernel, which has no ipip"


def test_daemon_on_this_kernel_exits_with_one_error_line(lab, etcd):
    etcd.put("/coreos.com/network/config", json.dumps(NET))
    d = start_daemon(lab.add_host("h1"), "--iface", "eth0")
    assert d.wait_exit(timeout=30) == 1
    text = d.log_text()
    errors = [ln for ln in text.splitlines() if "level=error" in ln or "level=critical" in ln]
    assert len(errors) == 1, text
    assert "ipip backend: create ipip device flannel.ipip: the kernel has no ipip device type" in errors[0]
    assert "modprobe ipip" in errors[0] and "Traceback" not in text
    assert etcd.get_prefix("/coreos.com/network/subnets/") == {}
