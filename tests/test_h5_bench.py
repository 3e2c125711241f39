"""`attnext bench` names a contender missing from the whole run once, not once per case (issue 14)."""

import io

import attnext
import pytest

from attnext.bench import machine, report
from attnext.bench.runner import Progress, run_suite


@pytest.fixture
def keep_threads():
    before = attnext.get_num_threads()
    yield
    attnext.set_num_threads(before)


def test_missing_torch_is_named_once(monkeypatch, keep_threads, capsys):
    monkeypatch.setattr(machine, "torch_or_reason", lambda: (None, "PyTorch not importable (test)"))
    doc = run_suite("tiny", ["tiny-softmax", "tiny-sdpa", "tiny-sdpa-causal-gqa"], progress=True, probe=False)
    progress = capsys.readouterr().err
    assert "torch" not in progress  # no "torch skipped" line per case
    text = report.table(doc)
    assert text.count("PyTorch not importable (test)") == 1
    assert "vs torch" not in text
    md = report.markdown(doc)
    assert md.count("PyTorch not importable (test)") == 1
    assert "torch (median)" not in md and "attnext vs torch" not in md
    for case in doc["cases"]:  # the JSON still records the skip per case, for tools
        assert case["results"]["torch"] == {"status": "skipped", "reason": "PyTorch not importable (test)"}


def test_quiet_progress_step_advances_without_a_line():
    stream = io.StringIO()
    bar = Progress(3, stream=stream)
    bar.update("a: torch skipped", 1, quiet=True)
    bar.update("a: attnext done", 1)
    assert bar.done == 2
    assert stream.getvalue().count("\n") == 1 and "attnext done" in stream.getvalue()
