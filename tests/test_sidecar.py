"""Content hashes, fingerprints, atomic writes and sidecars (engineforge/sidecar.py)."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import stat
from pathlib import Path

import pytest
from engineforge import integrity, sidecar

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# -- sha256_file --------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2, 1 << 20])
def test_sha256_file_is_the_standard_digest_whatever_the_chunk_size(tmp_path, chunk):
    """Reading in chunks (here smaller than the file) hashes the whole content."""
    # setup
    path = tmp_path / "abc.bin"
    path.write_bytes(b"abc")
    # execute
    digest = sidecar.sha256_file(path, chunk=chunk)
    # assert
    assert digest == ABC_SHA256


def test_sha256_file_of_an_empty_file(tmp_path):
    # setup
    path = tmp_path / "empty"
    path.write_bytes(b"")
    # execute / assert
    assert sidecar.sha256_file(str(path)) == EMPTY_SHA256


def test_sha256_file_of_a_missing_file_raises(tmp_path):
    # execute / assert
    with pytest.raises(FileNotFoundError):
        sidecar.sha256_file(tmp_path / "absent")


# -- canonical_json and fingerprint -------------------------------------------------------------
def test_canonical_json_is_sorted_compact_and_stringifies_other_types():
    # execute
    text = sidecar.canonical_json({"b": 1, "a": [Path("/x/y"), None]})
    # assert
    assert text == '{"a":["/x/y",null],"b":1}'


FP_ARGS = {"input_hashes": {"onnx": "1" * 64}, "config_slice": {"opt": 3, "mode": "graph"},
           "tools": {"onnx": "1.17"}, "device": "cpu:x86_64:2cores"}


def test_fingerprint_is_a_sha256_hex_independent_of_key_order():
    # setup: the same content, every dict built in the reverse key order
    reordered = {k: dict(reversed(list(v.items()))) if isinstance(v, dict) else v
                 for k, v in reversed(list(FP_ARGS.items()))}
    # execute
    a, b = sidecar.fingerprint(**FP_ARGS), sidecar.fingerprint(**reordered)
    # assert
    assert re.fullmatch(r"[0-9a-f]{64}", a) is not None
    assert a == b


@pytest.mark.parametrize("field,changed", [
    ("input_hashes", {"onnx": "2" * 64}),
    ("config_slice", {"opt": 2, "mode": "graph"}),
    ("tools", {"onnx": "1.18"}),
    ("device", "NVIDIA H100:sm9.0"),
    ("device", None),
])
def test_fingerprint_changes_with_each_part(field, changed):
    """Inputs, config slice, tool versions and device class each change the fingerprint."""
    # execute
    before = sidecar.fingerprint(**FP_ARGS)
    after = sidecar.fingerprint(**{**FP_ARGS, field: changed})
    # assert
    assert before != after


# -- writer names: what integrity.sweep recognises ----------------------------------------------
def test_writer_names_this_process_and_host():
    # execute / assert
    assert sidecar.writer() == f"{os.getpid()}@{socket.gethostname()}"


def test_scratch_prefix_names_a_staging_dir_integrity_attributes_to_this_process():
    # setup: tempfile appends a random suffix of letters, digits and "_"
    name = sidecar.scratch_prefix() + "ab_c12"
    # execute
    m = integrity.STAGING_DIR.match(name)
    # assert
    assert m is not None
    assert (m["host"], int(m["pid"])) == (socket.gethostname(), os.getpid())


# -- atomic_path / write_json / read_json -------------------------------------------------------
def test_atomic_path_renames_into_place_with_mode_0644_and_leaves_no_temp(tmp_path):
    """The file appears only on success, under a temp name integrity attributes to this
    process, in a parent directory made on demand, readable by others (mkstemp's 0600 is
    not kept)."""
    # setup
    target = tmp_path / "new" / "dir" / "engine.onnx"
    seen = {}
    # execute
    with sidecar.atomic_path(target) as part:
        part.write_bytes(b"payload")
        seen["part"], seen["target_existed"] = part, target.exists()
    # assert
    part = seen["part"]
    assert part.parent == target.parent and part != target
    m = integrity.TEMP_FILE.match(part.name)
    assert m is not None and int(m["pid"]) == os.getpid() and m["host"] == socket.gethostname()
    assert seen["target_existed"] is False
    assert target.read_bytes() == b"payload"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["engine.onnx"]


def test_atomic_path_on_error_keeps_the_old_file_and_removes_the_temp(tmp_path):
    """An interrupted write never replaces (or half-writes) the published file."""
    # setup
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    class Interrupted(Exception):
        pass

    # execute
    with pytest.raises(Interrupted):
        with sidecar.atomic_path(target) as part:
            part.write_bytes(b"half")
            raise Interrupted
    # assert
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_write_json_then_read_json_round_trips_with_sorted_keys(tmp_path):
    # setup
    path = tmp_path / "side.json"
    data = {"z": 1, "a": {"y": [1, 2], "b": None}, "p": Path("/some/file")}
    # execute
    sidecar.write_json(path, data)
    # assert
    text = path.read_text()
    assert text.endswith("}\n")
    assert list(json.loads(text)) == ["a", "p", "z"]  # keys sorted on disk
    assert text.index('"b"') < text.index('"y"')
    assert sidecar.read_json(path) == {"z": 1, "a": {"y": [1, 2], "b": None}, "p": "/some/file"}


def test_write_json_replaces_an_existing_file(tmp_path):
    # setup
    path = tmp_path / "side.json"
    path.write_text('{"old": true}')
    # execute
    sidecar.write_json(path, {"new": True})
    # assert
    assert sidecar.read_json(path) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["side.json"]


def test_read_json_of_invalid_json_raises_value_error(tmp_path):
    # setup
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    # execute / assert
    with pytest.raises(ValueError):
        sidecar.read_json(path)


# -- where a job ran ----------------------------------------------------------------------------
def test_cpu_device_names_machine_and_core_count():
    # execute / assert
    assert sidecar.cpu_device() == f"cpu:{platform.machine()}:{os.cpu_count()}cores"


def test_where_ran_outside_slurm(monkeypatch):
    # setup
    for var in ("SLURM_JOB_ID", "SLURM_CLUSTER_NAME", "SLURM_JOB_PARTITION"):
        monkeypatch.delenv(var, raising=False)
    # execute
    ran = sidecar.where_ran(100.12345, 160.98765)
    # assert
    assert ran == {"host": socket.gethostname(), "slurm_job_id": None, "slurm_cluster": None,
                   "slurm_partition": None, "started_at": 100.123, "finished_at": 160.988}


def test_where_ran_inside_a_slurm_job(monkeypatch):
    # setup
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "hpc")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "gpu")
    # execute
    ran = sidecar.where_ran(1.0, 2.0)
    # assert
    assert (ran["slurm_job_id"], ran["slurm_cluster"], ran["slurm_partition"]) == (
        "4242", "hpc", "gpu")


# -- output_record / make_sidecar ---------------------------------------------------------------
def test_output_record_holds_hash_size_and_mtime(tmp_path):
    # setup
    path = tmp_path / "abc.bin"
    path.write_bytes(b"abc")
    os.utime(path, ns=(1_000_000_000, 1_234_567_891_000))
    # execute
    rec = sidecar.output_record(path)
    # assert
    assert rec == {"path": str(path), "sha256": ABC_SHA256, "bytes": 3,
                   "mtime_ns": 1_234_567_891_000}


def test_make_sidecar_hashes_inputs_and_records_existing_outputs_only(tmp_path):
    """Input roles get their content hash; an output role whose file is missing is left
    out (the stage did not produce it)."""
    # setup
    src = tmp_path / "in.onnx"
    src.write_bytes(b"abc")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"")
    # execute
    side = sidecar.make_sidecar(stage="simplify", model="m", inputs={"onnx": src},
                                config_slice={"k": 1}, tools={"onnxsim": "0.4"},
                                outputs={"onnx": out, "log": tmp_path / "missing.txt"},
                                device=None)
    # assert
    assert side["sidecar_version"] == 1
    assert (side["stage"], side["model"], side["device"]) == ("simplify", "m", None)
    assert side["inputs"] == {"onnx": {"path": str(src), "sha256": ABC_SHA256}}
    assert list(side["outputs"]) == ["onnx"]
    assert side["outputs"]["onnx"]["sha256"] == EMPTY_SHA256
    assert (side["config"], side["tools"], side["result"]) == ({"k": 1}, {"onnxsim": "0.4"}, {})


def test_make_sidecar_fingerprint_follows_the_input_content_not_its_path(tmp_path):
    """Given input hashes are used as given (not re-read); equal content under another path
    gives the same fingerprint, other content or settings another one."""
    # setup
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    a.write_bytes(b"abc")
    b.write_bytes(b"abc")
    c.write_bytes(b"abd")

    def fp(path, config=None, hashes=None):
        return sidecar.make_sidecar(stage="s", model="m", inputs={"x": path},
                                    config_slice=config or {"k": 1}, tools={}, outputs={},
                                    input_hashes=hashes)["fingerprint"]

    # execute
    two_paths = (fp(a), fp(b))
    given = fp(c, hashes={"x": ABC_SHA256})  # c's bytes differ; the given hash wins
    # assert
    assert two_paths[0] == two_paths[1] == given
    assert fp(c) != fp(a)
    assert fp(a, config={"k": 2}) != fp(a)
