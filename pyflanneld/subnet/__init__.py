"""Subnet leases: datastore-neutral manager (manager.py) over etcd v3 (etcdv3.py) or v2 (etcdv2.py)."""
