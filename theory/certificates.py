"""Lyapunov certificates and Theorems 5.1/5.2 checks (THEORY.md §6-§7)."""
