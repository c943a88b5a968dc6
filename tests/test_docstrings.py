"""The examples in the docstrings of the public entry points run (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = ["theory.spec", "theory.architectures", "pruning.models", "pruning.convert", "pruning.config",
           "pruning.train", "pruning.export", "pruning.sweep", "pruning.userdata"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    torch.manual_seed(0)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name != "pruning.export":  # export's examples need a trained run: all marked +SKIP
        assert result.attempted > 0
