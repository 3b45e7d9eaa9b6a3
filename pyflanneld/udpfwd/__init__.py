"""The udp backend's userspace forwarder: TUN ⇄ UDP, wire-compatible with upstream flannel.

Modules: :mod:`.packet` (TTL, ICMP, route table — pure), :mod:`.tun` (TUN queues),
:mod:`.mmsg` (recvmmsg/sendmmsg), :mod:`.worker` (one forwarding process), :mod:`.control`
(route-update messages), :mod:`.supervisor` (the daemon side), :mod:`.device` (address, MTU, route).
"""
