"""The benchmark suite behind ``attnext bench``.

- :func:`run_suite` runs a suite (``quick``, ``full``) and returns the results document,
- :mod:`.schema` holds that document's JSON schema and a validator,
- :mod:`.report` renders it (terminal table, CSV, Markdown, chart) and compares two runs.

See docs/benchmarks.md for what each number means.
"""

from __future__ import annotations

from .runner import run_suite
from .schema import SCHEMA, SCHEMA_ID, SchemaError, validate

__all__ = ["run_suite", "SCHEMA", "SCHEMA_ID", "SchemaError", "validate"]
