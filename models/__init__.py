"""Demo model zoo shipped with engineforge (digits CNN, tiny super-resolution net)."""
