"""The JSON results document of ``attnext bench --json``: its schema and a validator.

The schema is JSON Schema (draft 2020-12 subset); ``attnext bench --schema`` prints it.
:func:`validate` checks a document against it without third-party packages (it implements the
keywords the schema uses: type, properties, required, additionalProperties, items, enum,
minimum, const); when ``jsonschema`` is installed the tests also check with it.
"""

from __future__ import annotations

SCHEMA_ID = "attnext-bench/1"

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}

_RESULT = {
    "type": "object",
    "required": ["status"],
    "properties": {
        # inaccurate: a peer outside the case's tolerance (checked first, not timed)
        "status": {"enum": ["ok", "skipped", "error", "inaccurate"]},
        "reason": _STR_OR_NULL,
        "times_s": {"type": "array", "items": {"type": "number", "minimum": 0}},
        "repeats": {"type": "integer", "minimum": 1},
        "number": {"type": "integer", "minimum": 1},
        "median_s": {"type": "number", "minimum": 0},
        "q1_s": _NUM, "q3_s": _NUM, "min_s": _NUM, "max_s": _NUM,
        "rate": {"type": "number", "minimum": 0},
        # at most 1 since the FMA probe (saved runs of earlier versions may hold more)
        "fraction_of_peak": _NUM_OR_NULL,
        "over_peak": {"type": "number", "minimum": 1},  # the raw fraction, when above the probed peak
    },
    "additionalProperties": False,
}

# fwd+bwd cases: attnext's forward timed alone beside them, and the targets.
_BACKWARD = {
    "type": "object",
    "required": ["forward_work", "targets", "met"],
    "properties": {
        "forward_work": {"type": "number", "minimum": 0},
        "forward_median_s": {"type": "number", "minimum": 0},
        "forward_rate": {"type": "number", "minimum": 0},
        "fwd_bwd_rate": {"type": "number", "minimum": 0},
        "fraction_of_forward": {"type": "number", "minimum": 0},
        "attnext_vs_torch": {"type": "number", "minimum": 0},
        "targets": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        "met": {"type": "object", "additionalProperties": {"type": "boolean"}},
        "forward_error": {"type": "string"},
    },
    "additionalProperties": False,
}

# bfloat16 SDPA cases: a contender's error against a float64 computation on the same inputs.
_ACCURACY = {
    "type": "object",
    "required": ["against"],
    "properties": {"against": {"type": "string"}, "max_abs_err": {"type": "number", "minimum": 0},
                   "mean_abs_err": {"type": "number", "minimum": 0}, "error": {"type": "string"}},
    "additionalProperties": False,
}

_CASE = {
    "type": "object",
    "required": ["name", "group", "description", "dtype", "params", "metric", "work", "results", "ratios"],
    "properties": {
        "name": {"type": "string"},
        "group": {"enum": ["sdpa", "additive", "score", "mha", "kvcache", "softmax", "backward"]},
        "description": {"type": "string"},
        "dtype": {"enum": ["float32", "float64", "bfloat16"]},
        "params": {"type": "object"},
        "metric": {"enum": ["GFLOP/s", "GB/s"]},
        "work": {"type": "number", "minimum": 0},
        "tolerance": {"type": "number", "minimum": 0},
        "results": {"type": "object", "additionalProperties": _RESULT},
        "ratios": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        "check": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["against"],
            "properties": {"against": {"type": "string"}, "max_rel_diff": _NUM, "error": {"type": "string"},
                           "part": {"type": "integer", "minimum": 0}}}},
        "extra": {"type": "object"},
        # GB/s cases: a read probe over the case's working set after its timings (machine.reprobe_read).
        "read_probe": {"type": "object", "required": ["level", "at_start", "after_case", "set_bytes"],
                       "properties": {"level": {"enum": ["peak_read_gbs", "peak_read_gbs_llc", "peak_read_gbs_l2"]},
                                      "at_start": _NUM, "after_case": _NUM,
                                      "set_bytes": {"type": "integer", "minimum": 1}},
                       "additionalProperties": False},
        "backward": _BACKWARD,
        "accuracy": {"type": "object", "additionalProperties": _ACCURACY},
        "targets": {
            "type": "object", "required": ["targets", "met"],
            "properties": {"targets": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
                           "met": {"type": "object", "additionalProperties": {"type": "boolean"}}},
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "attnext benchmark results",
    "type": "object",
    "required": ["schema", "created", "suite", "machine", "peak", "contenders", "cases"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "created": {"type": "string"},
        "suite": {"type": "string"},
        "argv": {"type": ["array", "null"], "items": {"type": "string"}},
        "seed": {"type": "integer"},
        "elapsed_s": _NUM,
        "machine": {
            "type": "object",
            "required": ["cpu_model", "cores_logical", "cores_available", "simd", "versions", "threads"],
            "properties": {
                "cpu_model": {"type": "string"},
                "cores_logical": {"type": "integer", "minimum": 1},
                "cores_available": {"type": "integer", "minimum": 1},
                "simd": {"type": "string"},
                "platform": {"type": "string"},
                "build_info": {"type": "object"},
                "versions": {
                    "type": "object",
                    "required": ["python", "numpy", "attnext", "torch"],
                    "additionalProperties": _STR_OR_NULL,
                },
                "threads": {
                    "type": "object",
                    "required": ["requested", "attnext", "torch", "blas", "blas_method"],
                    "properties": {
                        "requested": {"type": "integer", "minimum": 1},
                        "attnext": {"type": "integer", "minimum": 1},
                        "torch": {"type": ["integer", "null"]},
                        "blas": {"type": ["integer", "null"]},
                        "blas_method": {"type": "string"},
                    },
                },
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "load_avg": _NUM_OR_NULL,
                "load_avg_before": _NUM_OR_NULL,
            },
        },
        "peak": {
            "type": "object",
            "required": ["method", "threads"],
            "properties": {
                "method": {"type": "string"},
                "threads": {"type": "integer"},
                "gemm_f32_gflops": _NUM, "gemm_f64_gflops": _NUM, "torch_gemm_f32_gflops": _NUM,
                "fma_f32_gflops": _NUM, "fma_f64_gflops": _NUM, "fma_bf16_gflops": _NUM, "gemm_bf16_gflops": _NUM,
                "f32_isa": {"type": "string"}, "f64_isa": {"type": "string"}, "bf16_isa": {"type": "string"},
                "llc_bytes": {"type": ["integer", "null"]}, "read_set_bytes": _NUM, "llc_read_set_bytes": _NUM,
                "peak_read_gbs_llc": _NUM, "l2_bytes": {"type": "integer"}, "l2_read_set_bytes": _NUM,
                "peak_read_gbs_l2": _NUM,
                # read_sum_gbs / read_gemv_gbs: the probes of earlier versions (saved runs still load)
                "read_sum_gbs": _NUM, "read_gemv_gbs": _NUM,
                "peak_gflops_float32": _NUM, "peak_gflops_float64": _NUM, "peak_gflops_bfloat16": _NUM,
                "peak_read_gbs": _NUM,
            },
            "additionalProperties": False,
        },
        "contenders": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["available", "reason"],
                "properties": {"available": {"type": "boolean"}, "reason": _STR_OR_NULL},
            },
        },
        "cases": {"type": "array", "items": _CASE},
    },
    "additionalProperties": False,
}


class SchemaError(ValueError):
    """A document does not match the schema; the message gives the JSON path."""


_TYPES = {
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "string": lambda x: isinstance(x, str),
    "integer": lambda x: isinstance(x, int) and not isinstance(x, bool),
    "number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
    "boolean": lambda x: isinstance(x, bool),
    "null": lambda x: x is None,
}


def validate(doc, schema=None, path="$"):
    """Raises :class:`SchemaError` naming the first place where ``doc`` breaks the schema."""
    schema = SCHEMA if schema is None else schema
    if "const" in schema and doc != schema["const"]:
        raise SchemaError(f"{path}: expected {schema['const']!r}, got {doc!r}")
    if "enum" in schema and doc not in schema["enum"]:
        raise SchemaError(f"{path}: {doc!r} is not one of {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](doc) for t in types):
            raise SchemaError(f"{path}: expected {' or '.join(types)}, got {type(doc).__name__} {doc!r:.60}")
    if "minimum" in schema and _TYPES["number"](doc) and doc < schema["minimum"]:
        raise SchemaError(f"{path}: {doc} is below the minimum {schema['minimum']}")
    if isinstance(doc, dict):
        for key in schema.get("required", ()):
            if key not in doc:
                raise SchemaError(f"{path}: missing required key {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in doc.items():
            if key in props:
                validate(value, props[key], f"{path}.{key}")
            elif extra is False:
                raise SchemaError(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                validate(value, extra, f"{path}.{key}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            validate(item, schema["items"], f"{path}[{i}]")
    return doc
