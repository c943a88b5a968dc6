"""Training that prunes itself (arXiv 2411.09127, THEORY.md §1–§5), in torch.

Data flows config → model → objective → trainer → pruner → report:
:mod:`pruning.config` (TOML), :mod:`pruning.models` (gated networks built from a
:class:`theory.NetworkSpec`), :mod:`pruning.objective` (``J = L/N`` with the
one complexity model of :mod:`theory.complexity`), :mod:`pruning.train`
(Algorithm 1), :mod:`pruning.compaction` (the ε-rule, physical removal),
:mod:`pruning.report` and :mod:`pruning.export`.  Command line:
``python -m pruning --help``.
"""
