# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs the pinned requirements, makes the demo media and shards,
#               trains demo_tiny on them, then evaluates it against a random init
#               (linear probe, retrieval: DEMO_DIR/run/results.json, plots) (DEMO_DIR=./demo by default)
#   make test   creates .venv, installs, runs ruff and the whole pytest suite, slow tests included
#               (what CI runs: .ci/run)
#   make test-fast   the same without the tests marked slow: the edit–test loop
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
PYTEST_WORKERS ?= 2

.PHONY: demo demo-shards test test-fast lint format install clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

# The demo: real mp4 media (H.264 + AAC) → record shards → sentencepiece → pretrain demo_tiny.
# Media and the tokenizer are made once; prepare_data resumes (finished shards are kept).
DEMO_MEDIA := $(DEMO_DIR)/media
DEMO_SHARDS := $(DEMO_DIR)/shards

$(DEMO_MEDIA)/dataset_info.json: | $(VENV)/.installed
	$(PY) scripts/make_demo_data.py --output_dir=$(DEMO_MEDIA)

demo-shards: $(DEMO_MEDIA)/dataset_info.json
	for split in train val test; do \
	  $(PY) scripts/prepare_data.py --manifest=$(DEMO_MEDIA)/$$split.jsonl \
	    --output_dir=$(DEMO_SHARDS)/$$split --num_shards=4 --short_side=64 --sample_rate=8000 \
	    || exit 1; \
	done
	# One record per segment (the retrieval manifests are manifests of windows): probe and retrieval.
	for split in train test; do \
	  $(PY) scripts/prepare_data.py --manifest=$(DEMO_MEDIA)/retrieval_$$split.jsonl \
	    --output_dir=$(DEMO_SHARDS)/segments_$$split --num_shards=2 --short_side=64 \
	    --sample_rate=8000 || exit 1; \
	done

$(DEMO_SHARDS)/tokenizer.model: | demo-shards
	$(PY) scripts/train_tokenizer.py --input_dir=$(DEMO_SHARDS)/train \
	  --output=$(DEMO_SHARDS)/tokenizer --vocab_size=1024

demo: demo-shards $(DEMO_SHARDS)/tokenizer.model
	rm -rf $(DEMO_DIR)/run
	$(PY) scripts/train.py --config=configs/demo_tiny.py --workdir=$(DEMO_DIR)/run \
	  --config.data.path=$(DEMO_SHARDS)
	# Linear probe + zero-shot retrieval, pretrained vs. random init: results.json and plots/.
	$(PY) scripts/report.py --workdir=$(DEMO_DIR)/run

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

test-fast: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q -m 'not slow' tests

clean:
	rm -rf $(VENV) $(DEMO_DIR)
