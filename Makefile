# `make predict` and `make test` do all the set-up on a fresh clone (no GPU, no Hugging Face hub needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TINY := weights/tiny

.PHONY: install tiny predict train test test-fast bench soak serve clean

install: $(VENV)/.installed

# torch first: its CPU wheel is local; installed after the rest, pip would pull the CUDA build. Then the project
# itself, editable (src/ stays the code that runs): `python -m idefics_cog...` and `idefics-cog` need no PYTHONPATH.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $$(grep '^torch==' requirements.txt)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

tiny: $(TINY)/COMPLETE

$(TINY)/COMPLETE: | $(VENV)/.installed
	$(PY) -m idefics_dev.tiny --out $(TINY)

# The main job: one streamed answer from the embedded tiny model, through the real Cog server.
# Your own question: make predict IMAGE=my.png PROMPT="What is in this picture?"
IMAGE ?= examples/xray.png
PROMPT ?= What does this X-ray show?
MAX_NEW_TOKENS ?= 48
predict: install tiny
	IDEFICS_BASE_WEIGHTS=$(TINY)/base IDEFICS_ADAPTER_WEIGHTS=$(TINY)/adapter script/predict -i image=@"$(IMAGE)" -i prompt="$(PROMPT)" -i max_new_tokens=$(MAX_NEW_TOKENS)

# A short fine-tuning of the tiny model through the real Cog server in train mode; the adapter goes to trained.tar.
train: install tiny examples/data.zip
	IDEFICS_BASE_WEIGHTS=$(TINY)/base script/train -i dataset=@examples/data.zip -i max_steps=20 -o trained.tar

examples/data.zip: examples/make_dataset.py examples/xray.png | $(VENV)/.installed
	$(PY) examples/make_dataset.py $@

# The suite on TEST_WORKERS processes (pytest-xdist; a file's tests stay on one worker, sharing its servers). Three
# on 2 cores: some tests wait on slow servers and timeouts while the others compute.
TEST_WORKERS ?= 3
test: install tiny
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# What a developer runs often: everything but the Cog server and the slow tests, in under a minute.
test-fast: install tiny
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not server and not slow"

bench: install tiny
	$(PY) bench/predict_overhead.py
	$(PY) bench/server_overhead.py
	$(PY) bench/weights.py
	$(PY) bench/training.py
	$(PY) bench/speed.py
	$(PY) bench/decode_step.py
	$(PY) bench/textstream.py
	$(PY) bench/setup_time.py
	$(PY) bench/mixed_adapters.py
	$(PY) bench/stalls.py
	$(PY) bench/choices.py
	$(PY) bench/hostile.py

# 16 concurrent requests of 8 large images (peak memory), then 300 mixed predictions through the real server:
# memory, temp files, cache (see BENCHMARKS.md).
soak: install tiny
	$(PY) bench/soak.py --requests 300 --large-requests 16

serve: install tiny
	IDEFICS_BASE_WEIGHTS=$(TINY)/base IDEFICS_ADAPTER_WEIGHTS=$(TINY)/adapter script/serve

clean:
	rm -rf $(TINY) .cog .pytest_cache examples/data.zip
