# make test / make demo set everything up on a fresh machine, then run.
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.hmoe-installed
APT_PKGS := dataset-fashion-mnist wordnet-base wordnet-sense-index iproute2 wrk
# the hanzi glyph data set (trainer/glyphs.py): Unihan and the CJK fonts it renders
APT_PKGS += unicode-data fonts-noto-cjk fonts-arphic-ukai fonts-arphic-uming fonts-arphic-gbsn00lp \
            fonts-arphic-gkai00mp fonts-wqy-microhei fonts-wqy-zenhei fonts-droid-fallback
PYTEST_ARGS ?=

.PHONY: setup system-packages test test-fast test-unit demo device-check bench bench-quick clean help

help:
	@echo "make test       set up (.venv, Debian data packages) and run the whole test suite"
	@echo "make test-fast  unit and integration tiers: the same without tests marked slow (a few minutes)"
	@echo "make test-unit  the unit tier only, for editing the round protocol (under a minute)"
	@echo "make demo       set up, then train HMoE and flat softmax on real Fashion-MNIST"
	@echo "make device-check  (root) the edge runtime on an emulated arm64 Debian userland (after make demo)"
	@echo "make bench      regenerate every benchmark and BENCHMARKS.md (about 1.5 hours on 2 cores)"
	@echo "make bench-quick  the same with smaller N and fewer repeats, into runs/bench-quick/ (about 10 min)"

setup: system-packages $(STAMP)

# Real data and WordNet from Debian when we can install them; elsewhere the
# libraries' own downloads are the fallback (the loaders say where they looked).
system-packages:
	@if dpkg -s $(APT_PKGS) >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	else \
	  echo "note: cannot apt-get install $(APT_PKGS) (not root or no apt-get);"; \
	  echo "      Fashion-MNIST will be downloaded by torchvision and WordNet by nltk if needed;"; \
	  echo "      the hanzi data set needs them (it names the package it misses)."; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[all]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/hmoe demo --out runs/demo

# The device path on 64-bit ARM (docs/DEVICE.md, "Boards"): needs root and binfmt_misc; says so and
# exits 0 where they are missing. The runtime inside the emulated userland also runs under each board
# profile's memory limit and CPU quota (benchmarks/boards.py); DEVICE_CHECK_ARGS="--train" adds a local
# training round (and runs it under each profile too).
BOARDS ?= pi-zero-2w 1gb 2gb
DEVICE_CHECK_ARGS ?=
device-check: setup
	@test -f runs/demo/bundle/manifest.json || $(MAKE) demo
	$(PY) benchmarks/device_check.py --boards $(BOARDS) $(DEVICE_CHECK_ARGS)

# BENCHMARKS.md and docs/results/bench/ (benchmarks/bench.py says what each step runs).
bench: setup
	$(PY) benchmarks/bench.py

bench-quick: setup
	$(PY) benchmarks/bench.py --quick

clean:
	rm -rf runs .pytest_cache
