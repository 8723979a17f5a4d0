"""Benchmarks and the memory planner: outside the core package, which never imports them."""
