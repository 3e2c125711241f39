#!/usr/bin/env python3
"""The API reference: HTML generated from the docstrings by pdoc (https://pdoc.dev, from PyPI).

    pip install -r requirements/docs.txt      # pdoc, pinned
    python tools/api_docs.py                  # writes docs/api/index.html (open it in a browser)
    python tools/api_docs.py --check          # CI: builds into a temporary folder, exit 1 on a problem

It documents the public modules (``attnext``, ``attnext.transformer``, ``attnext.reference``, ``attnext.plot``) of the
attnext that Python imports (an installed one, or ``PYTHONPATH=python`` after
``tools/dev_build.sh``). Docstrings are Google style (``Args:``, ``Returns:``).

Problems (each fails ``--check``):
- a warning pdoc or Python issues while loading and rendering the modules;
- a public function, class or method without a docstring;
- a public callable whose signature cannot be read (shown as ``(*args, **kwargs)``).
Notes (printed; they fail only with ``--strict``): public properties and attributes without a
docstring, public functions and methods with a parameter or return value not annotated.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import warnings
from pathlib import Path

MODULES = ("attnext", "attnext.transformer", "attnext.reference", "attnext.plot", "attnext.torch")
ROOT = Path(__file__).resolve().parent.parent


def _public(name: str) -> bool:
    return not name.startswith("_") or name == "__call__"


def audit(modules=MODULES) -> tuple[list[str], list[str]]:
    """(problems, notes) about the docstrings and signatures of the public API."""
    import pdoc.doc

    problems, notes = [], []

    def walk(ns, where):
        for name, member in ns.members.items():
            if not _public(name):
                continue
            if isinstance(ns, pdoc.doc.Class) and member.taken_from[0] != ns.taken_from[0] and \
                    not member.taken_from[0].startswith("attnext"):
                continue  # inherited from Python or NumPy (Exception.args, ...)
            qual = f"{where}.{name}"
            if isinstance(member, pdoc.doc.Function):
                if not member.docstring.strip():
                    problems.append(f"{qual}: no docstring")
                params = list(member.signature.parameters.values())
                if [p.kind for p in params] == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
                    problems.append(f"{qual}: signature cannot be read {member.signature}")
                bare = [p.name for i, p in enumerate(params) if p.annotation is inspect.Parameter.empty
                        and not (i == 0 and p.name in ("self", "cls"))]
                if bare:
                    notes.append(f"{qual}: parameters without annotation: {', '.join(bare)}")
                if member.signature.return_annotation is inspect.Signature.empty and name != "__init__":
                    notes.append(f"{qual}: return value without annotation")
            elif isinstance(member, pdoc.doc.Class):
                if not member.docstring.strip():
                    problems.append(f"{qual}: no docstring")
                walk(member, qual)
            elif isinstance(member, pdoc.doc.Variable) and not member.docstring.strip():
                notes.append(f"{qual}: no docstring")

    for name in modules:
        walk(pdoc.doc.Module.from_name(name), name)
    return problems, notes


def _short_annotations(format_annotation):
    """pdoc prints an annotation as the object it evaluates to, so numpy.typing.ArrayLike (a
    Union of seven private types) would fill a signature; this names such aliases instead."""
    import types
    import typing

    import numpy.typing as npt

    aliases = {"ArrayLike": npt.ArrayLike, "DTypeLike": npt.DTypeLike}

    def fmt(annotation) -> str:
        union = typing.get_origin(annotation) in (typing.Union, getattr(types, "UnionType", typing.Union))
        args = typing.get_args(annotation) if union else ()
        for name, alias in aliases.items():
            if annotation == alias:
                return name
            members = set(typing.get_args(alias))
            if members and members <= set(args):
                rest = ["None" if a is type(None) else format_annotation(a) for a in args if a not in members]
                return " | ".join([name] + rest)
        return format_annotation(annotation)

    return fmt


def build(out: Path, modules=MODULES) -> list[str]:
    """Renders the reference into `out`; returns the warnings issued meanwhile."""
    import pdoc
    import pdoc.doc
    import pdoc.render

    # Parameters are printed by inspect.Parameter.__str__ (inspect.formatannotation), return
    # values by pdoc.doc.formatannotation: both name the aliases while rendering.
    saved = inspect.formatannotation, pdoc.doc.formatannotation
    inspect.formatannotation = _short_annotations(saved[0])
    pdoc.doc.formatannotation = _short_annotations(saved[1])
    try:
        return _render(out, modules)
    finally:
        inspect.formatannotation, pdoc.doc.formatannotation = saved


def _render(out: Path, modules) -> list[str]:
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="google", show_source=False, footer_text="attnext API reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules, output_directory=out)
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "api",
                        help="output folder (default docs/api; generated, not committed)")
    parser.add_argument("--check", action="store_true",
                        help="build into a temporary folder and exit 1 on any problem (CI)")
    parser.add_argument("--strict", action="store_true", help="notes (missing annotations, ...) fail too")
    args = parser.parse_args(argv)
    try:
        import pdoc  # noqa: F401
    except ImportError:
        print("tools/api_docs.py needs pdoc: pip install -r requirements/docs.txt", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems, notes = audit()
    problems += [f"{w.category.__name__}: {w.message}" for w in caught]
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            problems += build(Path(tmp))
    else:
        problems += build(args.output)
        print(f"wrote {args.output / 'index.html'}")
    for line in notes:
        print(f"note: {line}")
    for line in problems:
        print(f"problem: {line}")
    failed = problems or (args.strict and notes)
    print(f"{len(problems)} problem(s), {len(notes)} note(s)" + (" (--strict: notes fail)" if args.strict else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
