"""speechgpt-rt."""
