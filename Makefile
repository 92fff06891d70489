# Shortcuts for the commands in README.md.
PY ?= python

.PHONY: install test test-fast lint smoke sweep table2 report ensemble bench ui clean

install:  ## the one install command
	$(PY) -m pip install -e '.[dev]'

test:  ## the one test command (what CI runs)
	$(PY) -m pytest -q

test-fast:  ## the fast lane: the suite without the slow end-to-end runs
	$(PY) -m pytest -q -m "not slow"

lint:
	ruff format --check fer_sweep hydra_plugins tests scripts
	ruff check fer_sweep hydra_plugins tests scripts

smoke:  ## every model of the main sweep for one epoch on a tiny subset
	$(PY) -m fer_sweep -m model=cnn2,cnn3,resnet transforms=norm,aug data.limit_per_class=10 trainer.epochs=1

sweep:  ## the main sweep: three models x two transforms, full recipe
	$(PY) -m fer_sweep -m model=cnn2,cnn3,resnet transforms=norm,aug

table2:  ## the study's Table 2 as one multirun
	$(PY) -m fer_sweep -m experiment=table2

report:  ## Table 2 / Table 1 / figures rebuilt from MLflow
	$(PY) -m fer_sweep.report

ensemble:  ## top-3 (by validation accuracy) softmax ensemble of the latest sweep
	$(PY) -m fer_sweep.ensemble --latest --top-k 3

bench:  ## fer_sweep vs the model's compute ceiling vs the naive pipeline
	$(PY) -m fer_sweep.bench --json bench.json

ui:  ## the MLflow UI over the default store, on 127.0.0.1
	$(PY) -m fer_sweep.ui

clean:
	rm -rf outputs multirun/*/ checkpoints
