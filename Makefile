# pyflanneld — everything a fresh Debian 12 machine (as root) needs is installed by `make setup`.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTEST_ARGS ?=
# make bench [REPEATS=3] [SCALE=0.1] [SCENARIOS="start burst"]: see `python -m bench --help`
REPEATS ?= 1
SCALE ?= 1
SCENARIOS ?=
APT_PKGS := etcd-server etcd-client iproute2 iptables nftables iperf3 tcpdump openssl curl procps iputils-ping \
            python3 python3-venv systemd \
            qemu-system-x86 busybox-static cpio kmod strongswan-charon strongswan-swanctl wireguard-tools

.PHONY: setup apt venv promtool test unit demo bench lint clean

setup: apt venv promtool

# Debian packages: only installed when something is missing (apt-get update is slow).
apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

# promtool (checks docs/prometheus.yml and the alert rules in tests/test_metrics.py), taken out of
# Debian's prometheus package without installing it: the package is a server (96 MB, a service
# that starts itself); only its promtool binary (static, 48 MB) is kept, in the venv.
promtool: $(VENV)/bin/promtool

$(VENV)/bin/promtool: | $(VENV)/.installed
	@tmp=$$(mktemp -d) && cd $$tmp && \
	{ apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus; }; } && \
	dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool && \
	install -m 755 usr/bin/promtool $(CURDIR)/$@ && cd / && rm -rf $$tmp

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,cloud,bench]'
	@touch $@

test: setup
	$(PY) -m pytest -n 3 --dist loadgroup $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -m "not lab" $(PYTEST_ARGS)

demo: setup
	$(PY) -m lab.demo

bench: setup
	$(PY) -m bench --repeats $(REPEATS) --scale $(SCALE) $(SCENARIOS)

lint: setup
	$(VENV)/bin/ruff check pyflanneld lab tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
