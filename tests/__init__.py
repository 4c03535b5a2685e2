# A regular package, so that `tests.*` imports resolve to this folder even when an installed
# distribution ships a top-level `tests` package of its own (torch-fidelity 0.4 does, and a
# regular package on sys.path beats a namespace package wherever it lies).
