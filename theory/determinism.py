"""Theorem 3.1 checks (THEORY.md §4)."""
