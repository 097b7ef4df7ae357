"""Versions of the tools a stage's output depends on (engineforge/versions.py): read from
package metadata, ``absent`` when not installed, overridden by ENGINEFORGE_TOOL_VERSIONS."""

from __future__ import annotations

import json

import pytest
from engineforge import versions

ENV = "ENGINEFORGE_TOOL_VERSIONS"
ABSENT = "engineforge-no-such-distribution"


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_an_installed_distribution_gives_its_version():
    # execute
    got = versions.version("pytest")
    # assert: the version the imported package reports about itself
    assert got == pytest.__version__


def test_a_distribution_not_installed_is_absent():
    # execute / assert
    assert versions.version(ABSENT) == "absent"


def test_an_override_wins_over_metadata_and_is_a_string(monkeypatch):
    """The override simulates an upgrade (of an installed tool) and pins what metadata
    cannot see (a missing one); numbers become strings like metadata's versions."""
    # setup
    monkeypatch.setenv(ENV, json.dumps({"pytest": "0.0.1", ABSENT: 10.1}))
    # execute
    got = versions.versions(["pytest", ABSENT])
    # assert
    assert got == {"pytest": "0.0.1", ABSENT: "10.1"}


def test_an_override_leaves_other_distributions_alone(monkeypatch):
    # setup
    monkeypatch.setenv(ENV, json.dumps({"onnxsim": "9.9"}))
    # execute
    got = versions.versions(["pytest", ABSENT])
    # assert
    assert got == {"pytest": pytest.__version__, ABSENT: "absent"}


def test_an_empty_override_variable_means_none(monkeypatch):
    # setup
    monkeypatch.setenv(ENV, "")
    # execute / assert
    assert versions.version(ABSENT) == "absent"


def test_versions_keeps_the_order_asked_for():
    # execute
    got = versions.versions([ABSENT, "pytest"])
    # assert
    assert list(got) == [ABSENT, "pytest"]


def test_tool_versions_of_a_stage_are_its_tools(monkeypatch):
    # setup: pinned versions, so the expectation does not depend on what is installed
    monkeypatch.setenv(ENV, json.dumps({"onnx": "1.0", "onnxsim": "2.0"}))
    # execute
    got = versions.tool_versions("simplify")
    # assert
    assert got == {"onnx": "1.0", "onnxsim": "2.0"}


def test_tool_versions_of_a_per_backend_job_put_the_backends_tools_first(monkeypatch):
    """The audit of a TensorRT engine depends on TensorRT's tools and on the audit's own."""
    # setup
    pins = {"tensorrt": "10.1", "tensorrt-cu13": "10.2", "tensorrt-cu12": "10.3",
            "polygraphy": "0.5", "onnxruntime-gpu": "1.2", "onnx": "1.3", "torch": "2.4"}
    monkeypatch.setenv(ENV, json.dumps(pins))
    # execute
    got = versions.tool_versions("audit", "tensorrt")
    # assert
    assert list(got.items()) == [("tensorrt", "10.1"), ("tensorrt-cu13", "10.2"),
                                 ("tensorrt-cu12", "10.3"), ("polygraphy", "0.5"),
                                 ("onnxruntime-gpu", "1.2"), ("onnx", "1.3"), ("torch", "2.4")]


def test_a_stage_with_no_tools_of_its_own_gets_the_backends(monkeypatch):
    # setup
    monkeypatch.setenv(ENV, json.dumps({"onnxruntime-gpu": "1.20", "onnxruntime": "1.19"}))
    # execute
    got = versions.tool_versions("build", "onnxruntime")
    # assert
    assert got == {"onnxruntime-gpu": "1.20", "onnxruntime": "1.19"}
    assert versions.tool_versions("build") == {}


def test_an_unknown_stage_is_a_key_error():
    # execute / assert
    with pytest.raises(KeyError):
        versions.tool_versions("no-such-stage")


@pytest.mark.parametrize("raw", ["not json", '["onnxsim"]', '"9.9"'])
def test_a_malformed_override_is_one_config_line(monkeypatch, raw):
    # setup
    from engineforge.errors import ConfigError

    monkeypatch.setenv("ENGINEFORGE_TOOL_VERSIONS", raw)
    # execute
    with pytest.raises(ConfigError) as err:
        versions.version("onnx")
    # assert
    line = str(err.value)
    assert line.startswith("[stage=config key=ENGINEFORGE_TOOL_VERSIONS] ")
    assert "is not a JSON object of versions" in line and "\n" not in line
