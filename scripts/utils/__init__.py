"""Canonical utilities of the Stage 1 pipeline: one module per concern.

Scripts import from the submodules directly (``from utils.jsonl_io import read_jsonl``) so that a
script which needs no model never pays for importing torch.
"""
