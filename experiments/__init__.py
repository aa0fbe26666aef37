"""Command-line entry points; run as `python -m experiments.<name>`."""
