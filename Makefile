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

.PHONY: setup apt venv test unit demo bench lint clean

setup: apt venv

# Debian packages: only installed when something is missing (apt-get update is slow).
apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

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
