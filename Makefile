# Shorthands for scripts/dev, which does the work (and its idempotent set-up) on its own.
.PHONY: setup demo demo-local test bench soak

setup demo demo-local test bench soak:
	bash scripts/dev $@
