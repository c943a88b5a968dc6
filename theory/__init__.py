"""Theory of complexity-aware structure discovery (arXiv 2411.09127): numpy/scipy/sympy only.

Importing :mod:`theory` never imports torch.  See docs/theory.md (the specification)
for the equation numbers cited in every docstring.
"""

from .architectures import (
    by_name,
    residual_mlp,
    resnet1d,
    resnet50,
    resnet_cifar,
    resnet_imagenet,
    wide_resnet_cifar,
)
from .complexity import (
    BlockGates,
    Coefficients,
    ComplexityModel,
    GateGrads,
    coefficients_for,
    ones_gates,
    reparametrize,
    validate_gates,
)
from .spec import Block, Layer, NetworkSpec, load_spec, save_spec

__all__ = [
    "Block",
    "BlockGates",
    "Coefficients",
    "ComplexityModel",
    "GateGrads",
    "Layer",
    "NetworkSpec",
    "by_name",
    "coefficients_for",
    "load_spec",
    "ones_gates",
    "reparametrize",
    "residual_mlp",
    "resnet1d",
    "resnet50",
    "resnet_cifar",
    "resnet_imagenet",
    "save_spec",
    "validate_gates",
    "wide_resnet_cifar",
]
