"""Keeps pytest's doctest collection away from the torch-only script."""

# make_torch_reference.py imports torch, which the test environment does not
# have; it is run by hand (see its docstring), never collected.
collect_ignore = ['make_torch_reference.py']
