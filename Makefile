# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TINY   := .cache/tiny-bundle
PYTEST_ARGS ?=

.PHONY: setup test demo gpu-check clean

# System packages (only when root and apt exists; CI runs as root). espeak-ng regenerates the speech fixtures
# (tests/fixtures/speech/make_fixtures.py); the committed fixtures mean the tests themselves need no apt package,
# so a failing apt mirror only warns.
APT_PACKAGES := espeak-ng

$(STAMP): pyproject.toml constraints.txt
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) \
	    || echo "warning: could not install$$missing (only needed to regenerate fixtures)"; fi; \
	fi
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip does not resolve a different build through another package's requirement
	$(VPY) -m pip install -q -c constraints.txt torch==2.13.0
	$(VPY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/speechgpt-rt demo --bundle $(TINY)

# For a lent GPU machine: runs on its preinstalled torch/triton (no installs), writes JSON under $$OUT.
gpu-check:
	bash .ci/gpu-check

clean:
	rm -rf $(VENV) .cache .pytest_cache
