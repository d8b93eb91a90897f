# voxpipe: `make demo` and `make test` set up everything they need on Debian/Ubuntu.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# libasound2-dev: simpleaudio builds from source; libportaudio2: sounddevice loads it;
# alsa-utils ships the ALSA config the null device includes; xvfb, xdotool and x11-apps (xwd)
# run and drive `voxpipe gui` in its test; iproute2 makes the two-host network-namespace test.
APT_PACKAGES := libasound2-dev libportaudio2 alsa-utils xvfb xdotool x11-apps iproute2
EXTRAS := local,audio,g4f,dev
STAMP := $(VENV)/.voxpipe-installed

.PHONY: demo test bench install coqui apt clean

demo: install
	deploy/demo.sh $(PY)

test: install coqui
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m tests.bench.run

install: $(STAMP)

$(STAMP): pyproject.toml | apt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
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
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[coqui]'
	touch $(COQUI_STAMP)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages: $$missing"; \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
