"""The package as a user meets it: build info, the console command, the public names."""

from __future__ import annotations

import subprocess
import sys

import attnext
from attnext import reference


def test_build_info_fields():
    info = attnext.build_info()
    for key in ("version", "compiler", "simd", "openmp", "eigen_version", "native"):
        assert key in info
    assert isinstance(info["openmp"], bool) and isinstance(info["native"], bool)
    assert info["simd"] in {"avx512", "avx2+fma", "avx2", "avx", "sse4.2", "sse2", "sve", "neon", "scalar"}
    assert info["eigen_version"].startswith("3.")


def test_info_command_prints_build_info():
    out = subprocess.run([sys.executable, "-m", "attnext", "info"], capture_output=True, text=True, check=True).stdout
    assert "simd" in out and "openmp" in out and "eigen_version" in out


def test_public_names_exist_in_both_twins():
    for name in ("score", "softmax", "weighted_sum", "attention", "scaled_dot_product_attention"):
        assert callable(getattr(attnext, name)) and callable(getattr(reference, name))
        assert name in attnext.__all__


def test_core_stub_lists_every_core_function():
    # python/attnext/_core.pyi is what type checkers and IDEs see of the extension.
    import re
    from pathlib import Path

    from attnext import _core

    stub = (Path(attnext.__file__).parent / "_core.pyi").read_text()
    stubbed = set(re.findall(r"^def (\w+)\(", stub, flags=re.M))
    compiled = {n for n in dir(_core) if not n.startswith("_") and callable(getattr(_core, n))}
    assert compiled == stubbed
