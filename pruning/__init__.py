"""Training that prunes itself (arXiv 2411.09127, THEORY §1–§5), in torch.

Data flows config → model → objective → trainer → pruner → report:
:mod:`pruning.config` (TOML), :mod:`pruning.models` (gated networks built from a
:class:`theory.NetworkSpec`), :mod:`pruning.objective` (``J = L/N`` with the
one complexity model of :mod:`theory.complexity`), :mod:`pruning.train`
(Algorithm 1), :mod:`pruning.compaction` (the ε-rule, physical removal),
:mod:`pruning.report` and :mod:`pruning.export`.  Command line:
``python -m pruning --help``.

The public API, importable from here (loaded on first use)::

    import pruning
    net = pruning.gate(my_resnet, torch.randn(1, 3, 32, 32))   # your own torch ResNet, gated
    net = pruning.build_model("resnet18", num_classes=10)      # or a built-in architecture
    net = pruning.from_spec(pruning.load_spec("net.toml"), mode="combined",
                            estimator="straight-through", theta_init=1.0)   # or a spec file
    report = pruning.Trainer(pruning.load_config("cfg.toml"), "runs/x", model=net).fit()
    data = pruning.from_datasets(train_ds, test_ds)             # your torch Datasets ...
    report = pruning.Trainer(cfg, "runs/y", model=net, data=data).fit()   # ... trained on
    cfg, model, ckpt = pruning.load_run("runs/x")
    pruning.save_export(pruning.export_deterministic(model), "runs/x/export", onnx=True)
    program, meta = pruning.load_export("runs/x/export")       # the network + input shape, classes, mean/std
    logits = program(meta.prepare(raw_batch))
    results = pruning.sweep_grid("cfg.toml", ["gamma=0.02,0.05", "rho=0.2,0.8"], seeds=3, out="runs/sweep1")
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> module that defines it (imported lazily: ``import pruning`` stays cheap).
_API = {
    # configuration
    "RunConfig": ".config", "load_config": ".config", "ConfigError": ".config",
    # data: the named datasets, your image folder / .npz file, your torch Datasets
    "load_dataset": ".data", "DataSplits": ".data", "Preprocess": ".data", "from_datasets": ".userdata",
    # networks
    "GatedNetwork": ".models", "build_model": ".models", "from_spec": ".models",
    "gate": ".convert", "ConversionError": ".convert",
    "NetworkSpec": "theory.spec", "load_spec": "theory.spec", "save_spec": "theory.spec",
    # training
    # (the function pruning.train.train is not listed: ``pruning.train`` is its module)
    "Trainer": ".train", "load_run": ".train", "export_run": ".train",
    "TrainingDiverged": ".train", "prune": ".compaction",
    "sweep_grid": ".sweep",
    # deployment
    "export_deterministic": ".export", "save_export": ".export", "save_onnx": ".export",
    "DeterministicNetwork": ".export", "load_export": ".export", "load_metadata": ".export",
    "ExportMetadata": ".export",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'pruning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
