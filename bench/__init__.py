"""Benchmarks for zerotrust-lab (``make bench``).

Each suite measures our code against a baseline run in the same process, on the same data,
and reports the figures and their ratio; nothing here asserts a timing.
"""
