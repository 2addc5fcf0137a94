"""Test support shipped with hfplug: tiny models and tokenizers, HUPD-format synthetic data.

Used by the tests, the benchmarks and scripts/make_quickstart_assets.py; nothing here is needed to train.
"""
