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

demo: $(STAMP)
	$(BIN)/calcinosis synth --out $(DEMO)/data --n-per-class-stain 20 --size 128 --seed 0 \
		--sheet $(DEMO)/contact_sheet.png
	@echo "demo: dataset in $(DEMO)/data, contact sheet $(DEMO)/contact_sheet.png"

clean:
	rm -rf $(DEMO)
