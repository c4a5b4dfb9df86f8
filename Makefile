# The README's two commands: `make demo` and `make test`. Both create the
# virtual environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= runs/demo

.PHONY: venv test demo lint clean

venv: $(STAMP)

# torch and torchvision are pinned to the builds that lie on this project's
# machines (other versions download gigabytes); the rest comes from pyproject.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole story on synthetic data: generate, train, calibrate, evaluate (in-lab
# and on another lab's staining), then predict held-out patches and a large region.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/calcinosis synth --out $(DEMO)/data --n-per-class-stain 300 --size 64 --mpp 2.0 \
		--seed 0 --sheet $(DEMO)/contact_sheet.png
	$(BIN)/calcinosis train --config configs/demo.yaml output_dir=$(DEMO)/train \
		data.manifest=$(DEMO)/data/manifest.csv
	$(BIN)/calcinosis evaluate --checkpoint $(DEMO)/train/best.safetensors \
		--data $(DEMO)/data/manifest.csv --split test --out $(DEMO)/report
	$(BIN)/calcinosis synth --out $(DEMO)/shifted --n-per-class-stain 20 --size 64 --mpp 2.0 \
		--seed 1 --shift 1.0
	$(BIN)/calcinosis evaluate --checkpoint $(DEMO)/train/best.safetensors \
		--data $(DEMO)/shifted/manifest.csv --split all --out $(DEMO)/report_shifted \
		--reference $(DEMO)/report/metrics.json
	$(BIN)/calcinosis synth --region 2048x1536 --mpp 2.0 --seed 3 --out $(DEMO)/region/region.png
	$(BIN)/calcinosis predict $(DEMO)/data/manifest.csv $(DEMO)/region/region.png --split test \
		--checkpoint $(DEMO)/train/best.safetensors --out $(DEMO)/predictions --quiet || test $$? -eq 3
	@echo
	@echo "demo finished; everything is under $(DEMO)/:"
	@echo "  contact sheet        $(DEMO)/contact_sheet.png"
	@echo "  run (checkpoints)    $(DEMO)/train/  (metrics.csv, best.safetensors, calibration.json)"
	@echo "  report (test split)  $(DEMO)/report/report.md"
	@echo "  report (other lab)   $(DEMO)/report_shifted/report.md"
	@echo "  predictions          $(DEMO)/predictions/predictions.csv, overlays/, geojson/, tiles/"

clean:
	rm -rf $(DEMO)
