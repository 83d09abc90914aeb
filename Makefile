# `make predict` and `make test` do all the set-up on a fresh clone (no GPU, no Hugging Face hub needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TINY := weights/tiny
export PYTHONPATH := $(CURDIR)/src

.PHONY: install tiny predict test bench soak serve clean

install: $(VENV)/.installed

# torch first: its CPU wheel is local; installed after the rest, pip would pull the CUDA build.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $$(grep '^torch==' requirements.txt)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

tiny: $(TINY)/COMPLETE

$(TINY)/COMPLETE: | $(VENV)/.installed
	$(PY) -m idefics_cog.tiny --out $(TINY)

# The main job: one streamed answer from the embedded tiny model, through the real Cog server.
predict: install tiny
	IDEFICS_BASE_WEIGHTS=$(TINY)/base IDEFICS_ADAPTER_WEIGHTS=$(TINY)/adapter script/predict -i image=@examples/xray.png -i prompt="What does this X-ray show?" -i max_new_tokens=48

test: install
	$(PY) -m pytest

bench: install tiny
	$(PY) bench/predict_overhead.py
	$(PY) bench/weights.py
	$(PY) bench/training.py
	$(PY) bench/speed.py

# 300 mixed predictions through the real server: memory, temp files, cache (see BENCHMARKS.md).
soak: install tiny
	$(PY) bench/soak.py --requests 300

serve: install tiny
	IDEFICS_BASE_WEIGHTS=$(TINY)/base IDEFICS_ADAPTER_WEIGHTS=$(TINY)/adapter script/serve

clean:
	rm -rf $(TINY) .cog .pytest_cache
