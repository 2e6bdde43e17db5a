# memefx: `make run` trains the default experiment on synthetic memes; `make test` runs the tests.
# Both create .venv when missing and install the project into it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch/torchvision: the CUDA build (runs on the CPU too) that pip takes from local files on these machines.
TORCH  := torch==2.14.1 torchvision==0.29.1
RUN_DIR ?= runs/synthetic_visualbert

.PHONY: install run run-here test test-slow lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints.txt $(TORCH)
	$(BIN)/python -m pip install -c constraints.txt -e '.[wandb,minilm,quant,dev,lightgbm]'
	$(BIN)/python scripts/check_install.py
	touch $(STAMP)

run: $(STAMP)
	rm -rf $(RUN_DIR)
	$(BIN)/memefx fit --config configs/experiment/synthetic_visualbert.yaml --trainer.default_root_dir $(RUN_DIR)

run-here:  # `make run` where memefx is already installed (containers)
	rm -rf $(RUN_DIR)
	memefx fit --config configs/experiment/synthetic_visualbert.yaml --trainer.default_root_dir $(RUN_DIR)

test: $(STAMP)  # the default suite: in-process tests, no test marked slow
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  # tests marked slow (subprocesses: DDP, torchrun, SLURM simulation, kill-resume); none is fine
	$(BIN)/python -m pytest -q -m slow || test $$? -eq 5

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs *.egg-info
