# voxpipe: `make demo` and `make test` set up everything they need on Debian/Ubuntu.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# libasound2-dev: simpleaudio builds from source; libportaudio2: sounddevice loads it;
# alsa-utils ships the ALSA config the null device includes.
APT_PACKAGES := libasound2-dev libportaudio2 alsa-utils
EXTRAS := local,audio,g4f,dev
STAMP := $(VENV)/.voxpipe-installed

.PHONY: demo test bench install apt clean

demo: install
	deploy/demo.sh $(PY)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m tests.bench.run

install: $(STAMP)

$(STAMP): pyproject.toml | apt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages: $$missing"; \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
