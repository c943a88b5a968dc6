"""Lemma 1/2 and integrator-agreement checks (THEORY.md §6-§7)."""
