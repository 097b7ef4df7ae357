"""The stage runner's own guarantees: unforeseen errors are one line in our format, a stage
that writes to its inputs is refused, Snakemake's report of a failed job is that line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from engineforge import runner, stages
from engineforge.job import Job


def job(tmp_path: Path, stage: str, inputs: dict, outputs: dict) -> Job:
    return Job(stage=stage, model="m", wildcards={"model": "m"}, inputs=inputs,
               outputs=outputs, settings=None, tools={}, device=None,
               log=tmp_path / "logs" / f"{stage}.log", artifacts=str(tmp_path))


def test_unforeseen_library_error_is_one_line_with_a_fix_and_the_log(tmp_path):
    """A drift job fed an audit sidecar that is not JSON: the library's JSONDecodeError is
    reported in our format (model, stage, fix, log path); the traceback is in the log only."""
    bad = tmp_path / "audit.json"
    bad.write_text("{ not json")
    j = job(tmp_path, "drift", {}, {"json": tmp_path / "drift.json",
                                   "md": tmp_path / "drift.md"})
    j = Job(**{**j.__dict__, "extra_inputs": [bad]})
    with pytest.raises(runner.StageFailed) as err:
        runner.run_job(j)
    line = str(err.value)
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("[model=m stage=drift] JSONDecodeError: ")
    assert "Fix: " in line and str(j.log) in line
    assert "Traceback (most recent call last)" in j.log.read_text()
    failure = (tmp_path / "_failures").glob("*")
    assert any(line in f.read_text() for f in failure)


def test_a_stage_that_writes_to_its_input_is_refused(tmp_path, monkeypatch):
    """What ModelOpt once did to simplify's published model.onnx: the job fails with one line
    naming the input, and publishes nothing. Positive control: the same stage with an input it
    leaves alone would have published (the body did write its output)."""
    monkeypatch.setitem(stages.STAGES, "misbehave", "misbehaving_stage")
    src = tmp_path / "model.onnx"
    src.write_bytes(b"onnx")
    out = tmp_path / "out"
    j = job(tmp_path, "misbehave", {"onnx": src},
            {"engine": out / "engine.onnx", "sidecar": out / "build.json"})
    with pytest.raises(runner.StageFailed) as err:
        runner.run_job(j)
    assert "modified its input(s) onnx" in str(err.value) and str(src) in str(err.value)
    assert src.read_bytes() == b"onnx\0"  # the body really wrote to it
    assert not (out / "engine.onnx").exists() and not (out / "build.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".staging-")]


def test_snakemake_report_of_a_stage_failure_is_our_line():
    """Snakemake's RuleException text (rule-file frames after our line) is cut to the line."""
    text = ('RuleException:\nStageFailed in file "/x/common.smk", line 60:\n'
            '[model=a stage=export] boom. Fix: do this\n'
            '  File "/x/export.smk", line 17, in __rule_export\n'
            '  File "/x/common.smk", line 60, in run_stage')
    record = logging.LogRecord("snakemake.logging", logging.ERROR, __file__, 1, text, (), None)
    assert runner.OneLineFailures().filter(record)
    assert record.msg == "[model=a stage=export] boom. Fix: do this"
    other = logging.LogRecord("snakemake.logging", logging.ERROR, __file__, 1,
                              "MissingInputException: x", (), None)
    runner.OneLineFailures().filter(other)
    assert other.msg == "MissingInputException: x"  # positive control: others untouched
