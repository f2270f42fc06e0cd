"""run_step: an export step (the ONNX fp32 trace) in a process of its own, so its memory leaves with it. A user error
in the step is one line, a crash is reported as a crash, and the export it belongs to leaves no output behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SAMPLES

from pocketvlm.errors import PocketVLMError

MICRO = SAMPLES / "micro"


@pytest.fixture
def steps(monkeypatch):
    """run_step's child imports tests/stepfakes.py: put the tests folder on its path."""
    import os

    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), here])))
    from pocketvlm.artifact import run_step

    return run_step


def test_run_step_returns_the_childs_result_and_passes_progress(steps, capfd):
    assert steps("stepfakes", "echo", {"value": [1, "two"]}, progress=True, what="a step") == {"value": [1, "two"]}
    assert "echo: working" in capfd.readouterr().err
    steps("stepfakes", "echo", {"value": 3}, progress=False, what="a step")
    assert "echo: working" not in capfd.readouterr().err


def test_run_step_user_error_is_one_line(steps):
    with pytest.raises(PocketVLMError) as e:
        steps("stepfakes", "user_error", {}, progress=False, what="a step")
    assert str(e.value) == "the model folder has no weights; re-download it"


@pytest.mark.parametrize("how", ["exception", "segfault", "exit"])
def test_run_step_crash_is_reported_as_a_crash(steps, how):
    with pytest.raises(RuntimeError) as e:
        steps("stepfakes", "crash", {"how": how}, progress=False, what="the fake trace")
    message = str(e.value)
    assert message.startswith("the fake trace failed in its subprocess")
    assert {"exception": "ZeroDivisionError", "segfault": "exit -11", "exit": "exit 0"}[how] in message


@pytest.mark.parametrize("function,error", [("user_error", PocketVLMError), ("crash", RuntimeError)])
def test_a_failing_onnx_trace_leaves_no_output(steps, monkeypatch, tmp_path, function, error):
    from pocketvlm.export import onnx as export_onnx
    from pocketvlm.models import resolve_source

    def fake_step(module, name, kwargs, *, progress, what):
        assert (module, name) == ("pocketvlm.export.onnx", "export_fp32") and ".partial-" in kwargs["root"]
        return steps("stepfakes", function, {"how": "segfault"} if function == "crash" else {}, progress=progress,
                     what=what)

    monkeypatch.setattr(export_onnx, "run_step", fake_step)
    out = tmp_path / "out"
    with pytest.raises(error):
        export_onnx.export(resolve_source(str(MICRO)), out, "int8", progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
