"""Hypothesis profiles for the hardening suites.

- ``ci`` (default): few examples per kernel so the suite stays fast.
- ``thorough``: many more; select it with ``ATTNEXT_FUZZ=thorough`` (or
  ``HYPOTHESIS_PROFILE=thorough``), optionally ``ATTNEXT_FUZZ_EXAMPLES=N`` to set the count.

Heavy variants of other suites (concurrency, leaks) run with ``ATTNEXT_HEAVY=1``.
"""

import os

from hypothesis import HealthCheck, settings

_examples = int(os.environ.get("ATTNEXT_FUZZ_EXAMPLES", "0"))
settings.register_profile("ci", max_examples=_examples or 20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=_examples or 2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or os.environ.get("ATTNEXT_FUZZ") or "ci")
