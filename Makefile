# csnet: `make demo` and `make test` set everything up on a fresh clone.
# Every target calls the CLI with flags kept here, so a result can be traced to this file.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CSNET  := $(BIN)/csnet
STAMP  := $(VENV)/.installed
NOW    := $(shell date +%Y%m%d-%H%M%S)

# demo: a real but short pipeline (about 2.5 minutes on 2 CPU cores)
DEMO_DIR   ?= runs/demo-$(NOW)
DEMO_FLAGS ?= --train-size 6000 --epochs 1 --seed 0

# reproduce-fashion: the seed-003 Fashion-MNIST experiment in CONTEXT.md: independent columns
# vs units after pool1, pool2 and fc (identity init); Adam 1e-3, 30 epochs, batch 128, L2 1e-5.
REPRO_DIR   ?= runs/reproduce-fashion-$(NOW)
REPRO_FLAGS ?= --epochs 30 --batch-size 128 --optimizer adam --lr 1e-3 --weight-decay 1e-5 --seed 0

.PHONY: install data demo test test-all reproduce-fashion clean-venv

install: $(STAMP) data

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST: idempotent. Found under $$CSNET_DATA_ROOT, ./data or /usr/share/datasets: nothing to do.
# Otherwise install the Debian package when we can (root + apt-get), else say how.
data: $(STAMP)
	@if $(BIN)/python -c "from csnet.data import DATASETS, locate; locate(DATASETS['fashion'])" 2>/dev/null; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "Fashion-MNIST not found. Install it with: sudo apt-get install dataset-fashion-mnist"; \
	else \
		echo "Fashion-MNIST not found. Put the four IDX files in ./data/fashion-mnist/ (see README)"; \
	fi

demo: install
	$(CSNET) pretrain --task fine   $(DEMO_FLAGS) --quiet --out $(DEMO_DIR)/pretrain-fine
	$(CSNET) pretrain --task coarse $(DEMO_FLAGS) --quiet --out $(DEMO_DIR)/pretrain-coarse
	$(CSNET) stitch $(DEMO_DIR)/pretrain-fine $(DEMO_DIR)/pretrain-coarse --stitch all --out $(DEMO_DIR)/stitched
	$(CSNET) train --stitch none $(DEMO_FLAGS) --out $(DEMO_DIR)/baseline
	$(CSNET) train --stitch all  $(DEMO_FLAGS) --out $(DEMO_DIR)/cross-stitch
	$(CSNET) train --from $(DEMO_DIR)/stitched $(DEMO_FLAGS) --out $(DEMO_DIR)/cross-stitch-pretrained
	$(CSNET) eval $(DEMO_DIR)/cross-stitch-pretrained --split test
	$(CSNET) compare $(DEMO_DIR)/baseline $(DEMO_DIR)/cross-stitch $(DEMO_DIR)/cross-stitch-pretrained --out $(DEMO_DIR)/compare
	@echo "demo done: runs in $(DEMO_DIR), table $(DEMO_DIR)/compare/compare.csv, plots $(DEMO_DIR)/compare/*.png"

test: install
	$(BIN)/python -m pytest -q

# Includes tests marked slow.
test-all: install
	$(BIN)/python -m pytest -q -m ""

reproduce-fashion: install
	$(CSNET) train --stitch none $(REPRO_FLAGS) --out $(REPRO_DIR)/baseline
	$(CSNET) train --stitch all --alpha 1 --beta 0 $(REPRO_FLAGS) --out $(REPRO_DIR)/cross-stitch
	$(CSNET) compare $(REPRO_DIR)/baseline $(REPRO_DIR)/cross-stitch --out $(REPRO_DIR)/compare

clean-venv:
	rm -rf $(VENV)
