"""Shared test configuration: hypothesis profiles.

The default profile keeps the suite fast; ``HYPOTHESIS_PROFILE=slow`` runs
every property on at least 200 examples (used with ``pytest -m slow`` or on
its own for a thorough pass).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "slow", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
