# The README's two commands: `make demo` and `make test`; `make test-fast` leaves out
# the tests marked slow (over ~5 s), for the edit-test loop. Each creates the
# virtual environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= runs/demo
SERVE  := inference/serve
NPM_STAMP := $(SERVE)/node_modules/.installed-stamp

.PHONY: venv test test-fast demo cross-style lint clean screenshots

venv: $(STAMP) $(NPM_STAMP)

# torch and torchvision are pinned to the builds that lie on this project's
# machines (other versions download gigabytes); the rest comes from pyproject.
# The page's front-end libraries (OpenSeadragon) come from npm, pinned by the
# committed lock file, into inference/serve/node_modules (not in git).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NPM_STAMP): $(SERVE)/package.json $(SERVE)/package-lock.json
	npm ci --prefix $(SERVE) --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

test: $(STAMP) $(NPM_STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) $(NPM_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole story on synthetic data: generate (both rendering styles), fine-tune,
# calibrate, evaluate in-lab, in each style and on another lab's staining, predict
# the other lab's patches and a large region, then one robustness table (with the real
# H&E patches of $(REAL_DEV) where that folder exists, and the cross-style runs of
# `make cross-style` where they have been made).
# The demo's patch size, resolution and count: configs/demo.yaml's data.image_size
# and data.mpp must agree (tests/test_config.py checks). 128 px at 1 um/px shows
# the same 128 um field as the earlier 64 px at 2 um/px and 96 px at 1.3333 um/px,
# sampled finely enough that small amyloid deposits stay visible, at the 1 um/px of
# a 10x scan (README, "Resolution is the synthetic sets' limit"); 240 patches a class
# and stain keep the training within the demo's time.
DEMO_SIZE := 128
DEMO_MPP  := 1.0
DEMO_N    := 240
SYNTH := $(BIN)/calcinosis synth --size $(DEMO_SIZE) --mpp $(DEMO_MPP)
CKPT   = $(DEMO)/train/best.safetensors
REAL_DEV ?= ../shared/real-dev/manifest.csv
CROSS ?= runs/cross

demo: $(STAMP)
	rm -rf $(DEMO)
	$(SYNTH) --out $(DEMO)/data --style mix --supersample 2 --n-per-class-stain $(DEMO_N) --seed 0 \
		--sheet $(DEMO)/contact_sheet.png
	$(BIN)/calcinosis train --config configs/demo.yaml output_dir=$(DEMO)/train \
		data.manifest=$(DEMO)/data/manifest.csv
	$(BIN)/calcinosis evaluate --checkpoint $(CKPT) \
		--data $(DEMO)/data/manifest.csv --split test --out $(DEMO)/report
	$(SYNTH) --out $(DEMO)/shifted --n-per-class-stain 20 --seed 1 --shift 1.0
	$(BIN)/calcinosis evaluate --checkpoint $(CKPT) --baseline-train $(DEMO)/data/manifest.csv \
		--data $(DEMO)/shifted/manifest.csv --split all --out $(DEMO)/report_shifted \
		--reference $(DEMO)/report/metrics.json
	$(SYNTH) --out $(DEMO)/style_a --style a --n-per-class-stain 20 --seed 2
	$(BIN)/calcinosis evaluate --checkpoint $(CKPT) --baseline-train $(DEMO)/data/manifest.csv \
		--data $(DEMO)/style_a/manifest.csv --split all --out $(DEMO)/report_style_a
	$(SYNTH) --out $(DEMO)/style_b --style b --n-per-class-stain 20 --seed 3
	$(BIN)/calcinosis evaluate --checkpoint $(CKPT) --baseline-train $(DEMO)/data/manifest.csv \
		--data $(DEMO)/style_b/manifest.csv --split all --out $(DEMO)/report_style_b
	$(BIN)/calcinosis synth --region 2048x1536 --mpp $(DEMO_MPP) --seed 3 --out $(DEMO)/region/region.png
	$(BIN)/calcinosis predict $(DEMO)/shifted/manifest.csv $(DEMO)/region/region.png \
		--checkpoint $(CKPT) --out $(DEMO)/predictions --quiet || test $$? -eq 3
	$(BIN)/calcinosis robustness --out $(DEMO)/robustness --title "Robustness of the demo model" \
		--report "in-distribution test (styles A+B)=$(DEMO)/report" \
		--report "style A, new seed=$(DEMO)/report_style_a" \
		--report "style B, new seed=$(DEMO)/report_style_b" \
		--report "other lab (style A, shift 1.0)=$(DEMO)/report_shifted" \
		--report "cross-style A->B (make cross-style)=$(CROSS)/a_on_b" \
		--report "cross-style B->A (make cross-style)=$(CROSS)/b_on_a" \
		--real-dev $(REAL_DEV) --checkpoint $(CKPT) --train-manifest $(DEMO)/data/manifest.csv
	@echo
	@echo "demo finished; everything is under $(DEMO)/:"
	@echo "  contact sheet        $(DEMO)/contact_sheet.png"
	@echo "  run (checkpoints)    $(DEMO)/train/  (metrics.csv, best.safetensors, calibration.json)"
	@echo "  report (test split)  $(DEMO)/report/report.md"
	@echo "  report (other lab)   $(DEMO)/report_shifted/report.md"
	@echo "  predictions          $(DEMO)/predictions/predictions.csv, overlays/, geojson/, tiles/"
	@echo "  robustness table     $(DEMO)/robustness/robustness.md"

# Cross-style transfer: the demo recipe trained on one rendering style only and
# tested on the other (and on its own), the colour baseline fitted on the same
# single-style training data. Two trainings: about twice the demo's time.
cross-style: $(STAMP)
	rm -rf $(CROSS)
	$(SYNTH) --out $(CROSS)/data_a --style a --supersample 2 --n-per-class-stain $(DEMO_N) --seed 10
	$(SYNTH) --out $(CROSS)/data_b --style b --supersample 2 --n-per-class-stain $(DEMO_N) --seed 11
	for s in a b; do \
		$(BIN)/calcinosis train --config configs/demo.yaml output_dir=$(CROSS)/train_$$s \
			data.manifest=$(CROSS)/data_$$s/manifest.csv || exit 1; \
	done
	for m in a b; do for d in a b; do \
		$(BIN)/calcinosis evaluate --checkpoint $(CROSS)/train_$$m/best.safetensors \
			--baseline-train $(CROSS)/data_$$m/manifest.csv --data $(CROSS)/data_$$d/manifest.csv \
			--split test --out $(CROSS)/$${m}_on_$$d || exit 1; \
	done; done
	$(BIN)/calcinosis robustness --out $(CROSS)/robustness --title "Cross-style transfer" \
		--report "trained on A, tested on A=$(CROSS)/a_on_a" \
		--report "trained on A, tested on B=$(CROSS)/a_on_b" \
		--report "trained on B, tested on B=$(CROSS)/b_on_b" \
		--report "trained on B, tested on A=$(CROSS)/b_on_a"

# The README's screenshots of the page (docs/serve_*.png), taken by the browser
# tests with the demo model (make demo first, or CKPT=path/to/best.safetensors).
screenshots: $(STAMP) $(NPM_STAMP)
	CALCINOSIS_SERVE_CHECKPOINT=$(CKPT) CALCINOSIS_SCREENSHOT_DIR=docs \
		$(BIN)/python -m pytest -q tests/test_serve_browser.py

clean:
	rm -rf $(DEMO)
