"""The README and CI agree (issue 14): the README's examples run, its test command installs no
second attnext, `.ci/run` runs exactly the README's commands, and the API reference tool
catches what it promises to."""

import doctest
import importlib.util
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _code_blocks(text: str, lang: str) -> list:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(title: str) -> list:
    return [line.strip() for block in _code_blocks(_section(title), "bash") for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _ci_commands() -> list:
    return [line.strip() for line in CI.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_install_then_the_readme_test_command():
    install, test = _commands("Install"), _commands("Tests")
    assert install == ["pip install ."]
    assert test == ["pip install -r requirements/test.txt && pytest"]
    ci = _ci_commands()
    assert install[0] in ci and test[0] in ci
    assert ci.index(install[0]) < ci.index(test[0])


def test_the_test_command_does_not_build_attnext_again():
    """`pip install ".[test,plot]"` after `pip install .` rebuilt the extension (62 s); the test
    command installs only requirement files."""
    for command in _commands("Tests"):
        for part in command.split("&&"):
            words = part.split()
            if words[:2] == ["pip", "install"]:
                targets = [w for w in words[2:] if not w.startswith("-")]
                assert all(Path(ROOT, t).is_file() and t.startswith("requirements/") for t in targets), part


def _requirements(name: str) -> set:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    return {line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()}


def test_test_requirements_equal_the_test_and_plot_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert _requirements("test.txt") == set(extras["test"]) | set(extras["plot"])


def test_readme_doctests_pass():
    """The Quickstart and the layers' examples, as doctests (NumPy 2 prints no np.True_)."""
    blocks = [b for b in _code_blocks(README, "python") if b.lstrip().startswith(">>>")]
    assert len(blocks) >= 2
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    globs = {}
    for i, block in enumerate(blocks):
        assert "np.True_" not in block and "np.False_" not in block
        test = parser.get_doctest(block, globs, f"README block {i}", "README.md", 0)
        runner.run(test, clear_globs=False)
        globs = test.globs
    assert runner.failures == 0, f"{runner.failures} README doctest(s) failed (run with -s to see them)"


def test_readme_scripts_run(tmp_path, monkeypatch):
    """The README's plain Python examples run as written (the heatmap one where matplotlib is)."""
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _code_blocks(README, "python") if not b.lstrip().startswith(">>>")]
    assert blocks
    for block in blocks:
        if "attnext.plot" in block or "from attnext import plot" in block:
            if importlib.util.find_spec("matplotlib") is None:
                continue
        exec(compile(block, "README.md", "exec"), {})
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "entry1.png").is_file() and (tmp_path / "entry1_head0.png").is_file()


def test_contributing_guide_is_linked_and_describes_ci():
    assert "docs/CONTRIBUTING.md" in README
    guide = (ROOT / "docs" / "CONTRIBUTING.md").read_text(encoding="utf-8")
    for command in ("tools/dev_build.sh", "pip install -r requirements/test.txt && pytest",
                    "python tools/api_docs.py --check", "tools/sanitize.sh -q tests"):
        assert command in guide
    assert "python tools/api_docs.py --check" in _ci_commands()[_ci_commands().index(
        "pip install -r requirements/test.txt && pytest") + 1]


def test_ci_type_checks_the_examples_with_a_pinned_mypy():
    assert "pip install -r requirements/typecheck.txt && mypy --follow-imports=silent examples" in _ci_commands()
    assert re.fullmatch(r"mypy==[\d.]+", "".join(_requirements("typecheck.txt")))
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py"))  # something to check


# ---- tools/api_docs.py (needs pdoc: pip install -r requirements/docs.txt) --------------------

@pytest.fixture
def api_docs(monkeypatch):
    pytest.importorskip("pdoc")
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import api_docs

    return api_docs


def test_api_docs_audit_flags_what_it_promises(api_docs, monkeypatch):
    module = types.ModuleType("h5_fake_api")
    module.__all__ = ["documented", "undocumented", "Layer"]
    code = '''
def documented(x: int) -> int:
    """Returns x."""
    return x

def undocumented(x):
    return x

class Layer:
    """A layer."""

    def forward(self, x):
        return x

    @property
    def size(self) -> int:
        return 1
'''
    exec(compile(code, "h5_fake_api.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "h5_fake_api", module)
    problems, notes = api_docs.audit(("h5_fake_api",))
    assert problems == ["h5_fake_api.undocumented: no docstring", "h5_fake_api.Layer.forward: no docstring"]
    assert "h5_fake_api.undocumented: parameters without annotation: x" in notes
    assert "h5_fake_api.Layer.size: no docstring" in notes
    assert not any(n.startswith("h5_fake_api.documented") for n in notes)


def test_api_docs_builds_the_plot_reference_cleanly(api_docs, tmp_path):
    assert api_docs.audit(("attnext.plot",)) == ([], [])
    assert api_docs.build(tmp_path, ("attnext.plot",)) == []
    assert (tmp_path / "index.html").is_file()
    assert "MAX_SIDE_PX" in (tmp_path / "attnext" / "plot.html").read_text(encoding="utf-8")


def test_api_docs_names_numpy_typing_aliases(api_docs, monkeypatch, tmp_path):
    """numpy.typing.ArrayLike is a Union of seven private types; the reference says ArrayLike."""
    import inspect

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "h5_fake_typed.py").write_text('''
from typing import Optional
import numpy as np
import numpy.typing as npt

def f(x: npt.ArrayLike, mask: Optional[npt.ArrayLike] = None, dtype: npt.DTypeLike = None) -> np.ndarray:
    """Returns x."""
    return np.asarray(x)
''')
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    tmp_path = tmp_path / "out"
    before = inspect.formatannotation
    assert api_docs.build(tmp_path, ("h5_fake_typed",)) == []
    assert inspect.formatannotation is before  # put back after rendering
    html = re.sub(r"<[^>]+>", "", (tmp_path / "h5_fake_typed.html").read_text(encoding="utf-8"))
    assert "x: ArrayLike" in html and "mask: ArrayLike | None = None" in html and "dtype: DTypeLike" in html
    assert "_SupportsArray" not in html


def test_api_docs_without_pdoc_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    monkeypatch.setitem(sys.modules, "pdoc", None)
    import api_docs

    assert api_docs.main(["--check"]) == 2
    assert "pip install -r requirements/docs.txt" in capsys.readouterr().err


def test_numpy_allclose_prints_a_plain_bool():
    """The README compares with np.allclose, whose repr is `True` under NumPy 1 and 2 alike."""
    assert repr(np.allclose(np.zeros(2), np.zeros(2))) == "True"


# ---- issue 15: the Training section and docs/backward.md -------------------------------------

def test_readme_training_section_names_every_gradient_export():
    import attnext

    training, overview = _section("Training: gradients and dropout"), _section("API overview")
    names = [n for n in attnext.__all__ if n.endswith("_backward") or n in ("vjp", "Gradients", "Pullback")]
    assert "vjp" in names and "scaled_dot_product_attention_backward" in names
    for name in names:
        assert f"`{name}" in overview, name
        assert name in training, name
    assert "docs/backward.md" in training and (ROOT / "docs" / "backward.md").is_file()
    assert "examples/train_numpy.py" in training and (ROOT / "examples" / "train_numpy.py").is_file()


def test_backward_doc_states_the_generators_constants():
    """docs/backward.md spells the dropout rule out; its constants are the ones the NumPy twin of
    the generator (and so the kernel it is tested against) uses."""
    philox = pytest.importorskip("attnext._philox")
    doc = (ROOT / "docs" / "backward.md").read_text(encoding="utf-8")
    for constant in (philox._MUL0, philox._MUL1, philox._BUMP0, philox._BUMP1):
        assert f"0x{int(constant):08X}" in doc
    assert f"Philox4x32-{philox._ROUNDS}" in doc
    for words in ("counter = (j >> 2, i, n mod 2³², n >> 32)", "key = (s mod 2³², s >> 32)", "j & 3",
                  "T = floor(p · 2³²)", "1 / (1 − p)", "os.urandom"):
        assert words in doc, words
