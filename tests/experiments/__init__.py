"""Tests of the command-line entry points and configs."""
