"""Benchmarks behind ``edugate bench``: each prints one JSON object per line on stdout.

Every benchmark measures a baseline in the same run, because the machines are shared and
noisy: a ratio against a same-run baseline means something, an absolute figure alone does not.
"""
