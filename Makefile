# The two commands of the README: `make demo` (the pipeline end to end on the embedded default
# corpus) and `make test` (the suite). Each creates or refreshes .venv and is idempotent.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# PyTorch's CPU-only wheels; a plain `pip install torch` on Linux pulls a multi-GB CUDA build.
# A +cpu build where one is at hand (a local wheel directory pip is pointed at), else the CPU index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_LOCAL ?= torch==2.13.0+cpu
PYTEST_ARGS ?=

.PHONY: demo test bench clean-demo

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet 'torch>=2.6'; \
	else \
		echo "no GPU: installing PyTorch's CPU build"; \
		$(PY) -m pip install --quiet '$(TORCH_CPU_LOCAL)' 2>/dev/null \
		|| $(PY) -m pip install --quiet --retries 1 --timeout 30 'torch>=2.6' --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests selected"; exit 0; fi; exit $$rc

CODEGPT := $(VENV)/bin/codegpt
# One process on every core; the four values `accelerate launch` would otherwise warn about.
ONE_PROCESS := --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

demo: $(STAMP)
	$(CODEGPT) data recipes/pretrain-cpu.yaml
	$(CODEGPT) pretrain $(ONE_PROCESS) recipes/pretrain-cpu.yaml
	$(CODEGPT) tasks recipes/docstring-tiny.yaml
	$(CODEGPT) sft $(ONE_PROCESS) recipes/docstring-tiny.yaml train.resume=false
	$(CODEGPT) merge checkpoints/docstring-tiny/final checkpoints/docstring-tiny-merged --overwrite
	$(CODEGPT) generate checkpoints/docstring-tiny-merged --task-examples data/tasks/docstring-tiny/val.jsonl \
		-n 1 --temperature 0 --max-new-tokens 80

# What `make demo` trained, for starting over after its recipes change (a run resumes only with
# the model and optimizer it began with); the token shards stay.
clean-demo:
	rm -rf checkpoints/pretrain-cpu checkpoints/docstring-tiny checkpoints/docstring-tiny-merged

bench: $(STAMP)
	$(PY) -m bench.loss_memory
	$(PY) -m bench.train_throughput
	$(PY) -m bench.tokenize_throughput
