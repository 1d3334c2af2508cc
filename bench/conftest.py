"""Benchmarks (``pytest bench/ --benchmark-only``): each group compares fcnkern's backends with the PyTorch way,
measured in the same run, on every device present. Peak memory is recorded in each result's extra_info."""
