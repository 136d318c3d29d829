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

# Reproductions and ablations: flags in configs/*.toml, three seeds each, compare + REPORT.md at the end.
# Every target has a -quick variant (small training set, 2 epochs) for trying it in minutes.
QUICK := --train-size 2000 --val-size 1000 --test-size 2000 --epochs 2
EXPERIMENTS := reproduce-fashion reproduce-two-domains reproduce-scenes compare-methods ablation-init ablation-lr ablation-pretrain data-starved
$(addsuffix -quick,$(EXPERIMENTS)): SCALE = $(QUICK)
$(addsuffix -quick,$(EXPERIMENTS)): TAG = -quick
RUN = runs/$@$(TAG)-$(NOW)

.PHONY: install data demo folder-demo test test-all bench clean-venv $(EXPERIMENTS) $(addsuffix -quick,$(EXPERIMENTS))

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
		echo "Fashion-MNIST not found. Put the four IDX files in ./data/fashion-mnist/ (see docs/data.md)"; \
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

# Your own kind of data: a folder of 1,000 real Fashion-MNIST items in colours, 32x32 and 40x40 PNGs
# resized to 32x32, with a label table
# (item, colour, ink, mask: classification, regression and segmentation), then independent columns
# against cross-stitch units on it (about a minute on 2 CPU cores).
FOLDER      ?= data/fashion-folder
FOLDER_DIR  ?= runs/folder-demo-$(NOW)
FOLDER_ARGS ?= --dataset folder:$(FOLDER) --tasks item,colour,ink,mask --image-size 32 --epochs 10 --seed 0 --quiet

folder-demo: install
	$(BIN)/python -m csnet.examples folder $(FOLDER)
	$(CSNET) train $(FOLDER_ARGS) --stitch none --out $(FOLDER_DIR)/independent
	$(CSNET) train $(FOLDER_ARGS) --out $(FOLDER_DIR)/cross-stitch
	$(CSNET) eval $(FOLDER_DIR)/cross-stitch
	$(CSNET) compare $(FOLDER_DIR)/independent $(FOLDER_DIR)/cross-stitch --out $(FOLDER_DIR)/compare

test: install
	$(BIN)/python -m pytest -q

# Includes tests marked slow.
test-all: install
	$(BIN)/python -m pytest -q -m ""

$(foreach e,$(EXPERIMENTS),$(eval $(e)-quick: $(e)))

# Experiment 1 of CONTEXT.md: independent columns vs units after pool1, pool2 and fc (identity init).
reproduce-fashion: install
	$(CSNET) train --config configs/fashion.toml --stitch none $(SCALE) --quiet --out $(RUN)/baseline
	$(CSNET) train --config configs/fashion.toml --stitch all --unit-init identity $(SCALE) --quiet --out $(RUN)/cross-stitch
	$(CSNET) compare $(RUN)/baseline $(RUN)/cross-stitch --out $(RUN)/compare

# Experiment 2: MLP columns pretrained per domain, stitched, then only the units trained on 2,000
# images of the shuffled MNIST + Fashion-MNIST union. Needs MNIST in DATA_ROOT/mnist (see docs/data.md).
reproduce-two-domains: install
	$(CSNET) pretrain --config configs/two-domains.toml --dataset mnist+fashion --task mnist $(SCALE) --quiet --out $(RUN)/mnist
	$(CSNET) pretrain --config configs/two-domains.toml --dataset mnist+fashion --task fashion $(SCALE) --quiet --out $(RUN)/fashion
	$(CSNET) stitch $(RUN)/mnist $(RUN)/fashion --stitch all --out $(RUN)/stitched
	$(CSNET) train --from $(RUN)/stitched --freeze-columns --stitch-lr-mult 100 --epochs 10 $(SCALE) --train-size 2000 --quiet --out $(RUN)/cross-stitch
	$(CSNET) compare $(RUN)/mnist $(RUN)/fashion $(RUN)/cross-stitch --reference $(RUN)/mnist --reference $(RUN)/fashion --out $(RUN)/compare

# The dense benchmark (fashion-scenes: segment, depth, presence, count; fcn columns): single-task references,
# independent columns (from scratch, and from the pretrained columns: what the units add, at equal training),
# hard sharing (one encoder, a head per task) and cross-stitch from the pretrained columns, three seeds
# each; compare with Δm against the single-task references.
SCENE_TASKS := segment depth presence count
reproduce-scenes: install
	for t in $(SCENE_TASKS); do \
		$(CSNET) pretrain --config configs/scenes.toml --task $$t $(SCALE) --quiet --out $(RUN)/single-$$t || exit 1; \
	done
	$(CSNET) stitch $(addprefix $(RUN)/single-,$(SCENE_TASKS)) --stitch all --out $(RUN)/stitched
	$(CSNET) stitch $(addprefix $(RUN)/single-,$(SCENE_TASKS)) --stitch none --out $(RUN)/side-by-side
	$(CSNET) train --config configs/scenes.toml --stitch none $(SCALE) --quiet --out $(RUN)/independent
	$(CSNET) train --config configs/scenes.toml --arch shared --share-until pool3 $(SCALE) --quiet --out $(RUN)/hard-sharing
	$(CSNET) train --config configs/scenes.toml --from $(RUN)/side-by-side $(SCALE) --quiet --out $(RUN)/independent-pretrained
	$(CSNET) train --config configs/scenes.toml --from $(RUN)/stitched $(SCALE) --quiet --out $(RUN)/cross-stitch
	$(CSNET) compare $(RUN)/independent $(RUN)/hard-sharing $(RUN)/independent-pretrained $(RUN)/cross-stitch \
		$(addprefix --reference $(RUN)/single-,$(SCENE_TASKS)) --out $(RUN)/compare

# Cross-stitch against the field, on the Fashion pair and on the scenes, three seeds each: independent columns,
# hard sharing, cross-stitch, NDDR and sluice with the plain sum of the losses, and cross-stitch with
# uncertainty weighting and DWA; compare with Δm against single-task references.
# $(call methods,CONFIG,FOLDER,LAST SHARED STAGE,REFERENCES)
define methods
	$(CSNET) train --config $(1) --arch independent $(SCALE) --quiet --out $(2)/independent
	$(CSNET) train --config $(1) --arch shared --share-until $(3) $(SCALE) --quiet --out $(2)/shared
	$(CSNET) train --config $(1) --arch cross-stitch $(SCALE) --quiet --out $(2)/cross-stitch
	$(CSNET) train --config $(1) --arch nddr $(SCALE) --quiet --out $(2)/nddr
	$(CSNET) train --config $(1) --arch sluice $(SCALE) --quiet --out $(2)/sluice
	$(CSNET) train --config $(1) --weighting uncertainty $(SCALE) --quiet --out $(2)/cross-stitch-uncertainty
	$(CSNET) train --config $(1) --weighting dwa $(SCALE) --quiet --out $(2)/cross-stitch-dwa
	$(CSNET) compare $(addprefix $(2)/,independent shared cross-stitch nddr sluice cross-stitch-uncertainty \
		cross-stitch-dwa) $(4) --out $(2)/compare
endef
compare-methods: install
	for t in fine coarse; do \
		$(CSNET) pretrain --config configs/fashion.toml --task $$t $(SCALE) --quiet --out $(RUN)/fashion/single-$$t || exit 1; \
	done
	$(call methods,configs/fashion.toml,$(RUN)/fashion,pool2,$(addprefix --reference $(RUN)/fashion/single-,fine coarse))
	for t in $(SCENE_TASKS); do \
		$(CSNET) pretrain --config configs/scenes.toml --task $$t $(SCALE) --quiet --out $(RUN)/scenes/single-$$t || exit 1; \
	done
	$(call methods,configs/scenes.toml,$(RUN)/scenes,pool3,$(addprefix --reference $(RUN)/scenes/single-,$(SCENE_TASKS)))

# The paper's unit-initialisation ablation: (alpha_S, alpha_D) and the identity / ones conventions.
# Units' lr x10: at x100 with SGD the 'ones' init (every input the sum of both columns) diverges.
ablation-init: install
	$(CSNET) train --config configs/ablation.toml --stitch none $(SCALE) --quiet --out $(RUN)/independent
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 10 --alpha 0.1 --beta 0.9 $(SCALE) --quiet --out $(RUN)/a0.1-b0.9
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 10 --alpha 0.5 --beta 0.5 $(SCALE) --quiet --out $(RUN)/a0.5-b0.5
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 10 --alpha 0.7 --beta 0.3 $(SCALE) --quiet --out $(RUN)/a0.7-b0.3
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 10 --alpha 0.9 --beta 0.1 $(SCALE) --quiet --out $(RUN)/a0.9-b0.1
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 10 --unit-init identity $(SCALE) --quiet --out $(RUN)/identity
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 10 --unit-init ones $(SCALE) --quiet --out $(RUN)/ones
	$(CSNET) compare $(RUN)/independent $(RUN)/a0.1-b0.9 $(RUN)/a0.5-b0.5 $(RUN)/a0.7-b0.3 $(RUN)/a0.9-b0.1 $(RUN)/identity $(RUN)/ones --out $(RUN)/compare

# The paper's learning-rate ablation: the units' learning rate scaled by 1, 10, 100, 1000.
ablation-lr: install
	$(CSNET) train --config configs/ablation.toml --stitch none $(SCALE) --quiet --out $(RUN)/independent
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 1 $(SCALE) --quiet --out $(RUN)/mult-1
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 10 $(SCALE) --quiet --out $(RUN)/mult-10
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 100 $(SCALE) --quiet --out $(RUN)/mult-100
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 1000 $(SCALE) --quiet --out $(RUN)/mult-1000
	$(CSNET) compare $(RUN)/independent $(RUN)/mult-1 $(RUN)/mult-10 $(RUN)/mult-100 $(RUN)/mult-1000 --out $(RUN)/compare

# Columns from single-task pretraining ("pretrain, then stitch", the paper's preference) vs from scratch.
ablation-pretrain: install
	$(CSNET) pretrain --config configs/ablation.toml --task fine $(SCALE) --quiet --out $(RUN)/pretrain-fine
	$(CSNET) pretrain --config configs/ablation.toml --task coarse $(SCALE) --quiet --out $(RUN)/pretrain-coarse
	$(CSNET) stitch $(RUN)/pretrain-fine $(RUN)/pretrain-coarse --stitch all --out $(RUN)/stitched
	$(CSNET) train --config configs/ablation.toml --stitch-lr-mult 100 $(SCALE) --quiet --out $(RUN)/from-scratch
	$(CSNET) train --config configs/ablation.toml --from $(RUN)/stitched --stitch-lr-mult 100 $(SCALE) --quiet --out $(RUN)/from-pretrained
	$(CSNET) compare $(RUN)/from-scratch $(RUN)/from-pretrained --reference $(RUN)/pretrain-fine --reference $(RUN)/pretrain-coarse --out $(RUN)/compare

# Data-starved: fine keeps 1,000 training labels, coarse all of them; independent vs cross-stitch.
data-starved: install
	$(CSNET) train --config configs/data-starved.toml --stitch none --starve fine=1000 $(SCALE) --quiet --out $(RUN)/independent
	$(CSNET) train --config configs/data-starved.toml --stitch all --starve fine=1000 $(SCALE) --quiet --out $(RUN)/cross-stitch
	$(CSNET) compare $(RUN)/independent $(RUN)/cross-stitch --out $(RUN)/compare

# Throughput side by side and a two-epoch full-data run (see docs/speed.md): about 4½ minutes on 2 cores.
bench: install
	$(CSNET) bench

clean-venv:
	rm -rf $(VENV)
