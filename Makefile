# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install system-deps demo test bench bench-full clean

install: system-deps $(STAMP)

# torch first, pinned: any later range it satisfies installs nothing more (no CUDA wheels pulled).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,postgres]'
	# piq: reference FSIM/VIF for the metric tests only. --no-deps: its torchvision would replace torch.
	$(PY) -m pip install -q --no-deps piq==0.8.0
	touch $(STAMP)

# DCMTK (storescu/storescp/dcm2pnm), dicom3tools (dciodvfy) and Orthanc, from Debian, when missing.
system-deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	{ command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ]; } || missing="$$missing orthanc"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

demo: install
	$(PY) -m dicomnode demo

test: install
	$(PY) -m pytest -q -ra

# Every benchmark, quickly sized (a few minutes on 2 cores): shows they all run. Figures for
# docs/benchmarks.md come from `make bench-full` (full size, elastix/ANTs as references; tens of
# minutes), reviewed by hand.
bench: install
	$(PY) benchmarks/receive.py --count 60 --reps 1 --parallel 2
	$(PY) benchmarks/registration.py --size 96 96 64 --cases CT --refs ""
	$(PY) benchmarks/fusion_speed.py --sizes 256 --seconds 1
	$(PY) benchmarks/fusion_quality.py --stride 20
	$(PY) benchmarks/end_to_end.py --reps 1 --synthetic --modes auto

bench-full: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/receive.py
	$(PY) benchmarks/registration.py
	$(PY) benchmarks/fusion_speed.py
	$(PY) benchmarks/fusion_quality.py
	$(PY) benchmarks/end_to_end.py

clean:
	rm -rf $(VENV) var build *.egg-info
