# voxpipe: `make demo` and `make test` set up everything they need on Debian/Ubuntu.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# libasound2-dev: simpleaudio builds from source; libportaudio2: sounddevice loads it;
# alsa-utils ships the ALSA config the null device includes; xvfb, xdotool and x11-apps (xwd)
# run and drive `voxpipe gui` in its test; iproute2 makes the two-host network-namespace test.
APT_PACKAGES := libasound2-dev libportaudio2 alsa-utils xvfb xdotool x11-apps iproute2
# chromium and its chromedriver run the page of `voxpipe web` headless in its browser test (driven by
# selenium); downloaded browser builds do not run here, Debian's do.
APT_PACKAGES += chromium chromium-driver
EXTRAS := local,audio,g4f,dev
STAMP := $(VENV)/.voxpipe-installed
# Every install is constrained by the lock: the exact versions `make test` passed with. `make lock`
# re-resolves them on purpose (then run `make test` and commit requirements.lock).
LOCK := requirements.lock
PIP := $(PY) -m pip install -q -c $(LOCK)

# llama.cpp, built portably: no -march=native, and one CPU backend per x86-64 level that ggml picks
# from at run time (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS), the way distributions build it. A venv,
# wheel or image built here then runs on any x86-64 CPU, instead of dying with SIGILL on an older
# one or taking a path its build CPU chose. deploy/llama-portable.cmake installs the variant modules.
# pip's wheel cache does not know CMAKE_ARGS, so this one build bypasses the cache: a wheel built
# natively by an earlier, plain pip install can never slip in. `LLAMA_CMAKE_ARGS=-DGGML_NATIVE=ON`
# builds for this CPU only (see docs/bench.md for what it buys).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
	-DCMAKE_PROJECT_llama_cpp_INCLUDE=$(CURDIR)/deploy/llama-portable.cmake

.PHONY: demo test check bench chaos install coqui apt clean lock

demo: install
	deploy/demo.sh $(PY)

# check comes first, so a lint or type error fails in seconds, before the Coqui install and the suite.
test: check coqui
	$(PY) -m pytest -q tests

# Lint (ruff, rules in pyproject.toml; nothing is reformatted) and types (mypy over services/ and
# launcher.py, the `files` in pyproject.toml). Needs only the dev extra, not Coqui.
check: install
	$(PY) -m ruff check services tests launcher.py deploy
	$(PY) -m mypy

bench: install
	$(PY) -m tests.bench.run

# The chaos test at length: 100 rounds of kill -9 on a random process of `voxpipe run` mid-reply
# (`make test` runs 10). VOXPIPE_CHAOS_SEED picks another reproducible sequence.
chaos: install
	VOXPIPE_CHAOS_ROUNDS=100 $(PY) -m pytest -q tests/test_chaos.py

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) deploy/llama-portable.cmake | apt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) --no-cache-dir --no-deps llama-cpp-python
	$(PIP) -e '.[$(EXTRAS)]'
	touch $(STAMP)

# Coqui TTS (the `coqui` extra), CPU only. The torch pin goes first so that pip takes the CPU build
# (torch 2.13.0+cpu lies on this machine kind's disk) instead of pulling a multi-GB CUDA build; on another
# machine point pip at a CPU wheel index with TORCH_PIP_ARGS="--index-url ...". Every PyPI torchaudio is
# linked against CUDA and fails to load beside a CPU torch: without its lib/*.so files it runs in
# pure-Python mode, which is all Coqui's VITS and XTTS need, so they are deleted (idempotently).
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_PIP_ARGS ?=
COQUI_STAMP := $(VENV)/.voxpipe-coqui

coqui: $(COQUI_STAMP)
	rm -f $(VENV)/lib/python3*/site-packages/torchaudio/lib/*.so

$(COQUI_STAMP): $(STAMP)
	$(PIP) $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(PIP) -e '.[coqui]'
	touch $(COQUI_STAMP)

# Re-resolve every extra (and the CPU torch) to the newest allowed versions; nothing is installed.
lock: install
	$(PY) deploy/lock.py '$(EXTRAS),coqui' '$(TORCH_SPEC)' $(TORCH_PIP_ARGS)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages: $$missing"; \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
