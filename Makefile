# Two commands on a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(PYTHON) -m pip
# torch is pinned exactly and installed first: these builds lie on the machine's disk, and an
# unpinned torch would pull a newer multi-GB CUDA build from the registry.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
# pytest-xdist workers of `make test` (the tests that share a session fixture stay on one).
TEST_WORKERS ?= 2
STAMP   := $(VENV)/.xdyna-installed
DEMO    ?= demo_data
PYTEST_ARGS ?=

.PHONY: install demo test clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check -e ".[dev,curate]"
	$(PIP) install -q --disable-pip-version-check --no-deps "facenet-pytorch>=2.6,<2.7"
	@touch $@

# The synthetic shards are a pure function of their arguments: written once, reused by re-runs
# (xdyna-data synth refuses a folder that already holds shards). A leftover folder without the
# stamp is an interrupted write of this same data and is rewritten.
$(DEMO)/shards/.synth-done: $(STAMP)
	rm -rf $(DEMO)/shards
	WANDB_MODE=offline $(VENV)/bin/xdyna-data synth --out $(DEMO)/shards --human 6 --scene 2 \
	    --frames 24 --height 128 --width 64
	@touch $@

# Every `make demo` trains the demo run from scratch: its previous run (runs/demo) is replaced.
demo: install $(DEMO)/shards/.synth-done
	rm -rf runs/demo
	WANDB_MODE=offline $(VENV)/bin/xdyna-train model=tiny data=synthetic stage=stage1 \
	    data.shards=$(CURDIR)/$(DEMO)/shards run.root=$(CURDIR)/runs run.id=demo \
	    trainer.max_steps=30

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass, so it fails here.
test: install
	@$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean-demo:
	rm -rf $(DEMO) runs/demo
