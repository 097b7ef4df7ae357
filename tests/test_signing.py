"""Signing keys and trust (engineforge/signing.py): formats, where the key comes from, the
permission check, one-line errors, and that trust is in no fingerprint."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import tiny_raw_config
from engineforge import config, redaction, signing
from engineforge.errors import ConfigError
from workflow_helpers import ROOT


@pytest.fixture
def key_env(tmp_path, monkeypatch):
    """A fresh key in ENGINEFORGE_SIGNING_KEY_FILE, trust reset for the test."""
    monkeypatch.delenv(signing.ENV_KEY, raising=False)
    path = tmp_path / "keys" / "signing.key"
    signing.generate(path)
    monkeypatch.setenv(signing.ENV_KEY_FILE, str(path))
    signing.configure(None)
    yield path
    path.chmod(0o600)
    signing.configure(None)


def other_key(tmp_path: Path, name="other") -> signing.SigningKey:
    path = tmp_path / f"{name}.key"
    signing.generate(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(signing.ENV_KEY_FILE, str(path))
        return signing.signing_key()


PAYLOAD = {"group": "build", "fingerprint": "ab" * 32, "files": {"engine.onnx": "cd" * 32},
           "provenance": {"host": "node7", "slurm_job_id": "4242"}}


def test_key_round_trip(key_env):
    # execute
    key = signing.signing_key()
    doc = signing.sign_entry(PAYLOAD)
    # assert: the formats, and the signature opens with the key that made it
    assert oct(key_env.stat().st_mode & 0o777) == "0o600"
    assert key_env.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    raw = base64.b64decode(key.public_key.removeprefix("ed25519:"), validate=True)
    assert key.public_key.startswith("ed25519:") and len(raw) == 32
    assert key.key_id == hashlib.sha256(raw).hexdigest()[:16] == doc["key_id"]
    assert doc["public_key"] == key.public_key
    assert signing.open_entry(doc, {key.public_key}) == PAYLOAD
    assert signing.trusted() == {key.public_key}  # the builder's own key is always trusted
    assert "PRIVATE" not in repr(key)


def test_a_signature_by_another_key_is_untrusted(key_env, tmp_path):
    # setup
    stranger = other_key(tmp_path)
    doc = signing.sign_entry(PAYLOAD, stranger)
    # execute / assert
    with pytest.raises(signing.Untrusted, match=f"^signed by untrusted key {stranger.key_id}$"):
        signing.open_entry(doc, signing.trusted())
    assert signing.open_entry(doc, {stranger.public_key}) == PAYLOAD  # control


@pytest.mark.parametrize("tamper", ["payload", "signature", "key_id", "unsigned"])
def test_a_tampered_entry_is_refused(key_env, tamper):
    # setup
    doc = signing.sign_entry(PAYLOAD)
    trusted = signing.trusted()
    assert signing.open_entry(doc, trusted) == PAYLOAD  # control: intact
    if tamper == "payload":
        doc["payload"] = {**PAYLOAD, "files": {"engine.onnx": "ee" * 32}}
    elif tamper == "signature":
        sig = bytearray(base64.b64decode(doc["signature"]))
        sig[0] ^= 1
        doc["signature"] = base64.b64encode(bytes(sig)).decode()
    elif tamper == "key_id":
        doc["key_id"] = "0" * 16
    else:
        del doc["signature"]
    # execute / assert
    with pytest.raises(signing.Untrusted) as err:
        signing.open_entry(doc, trusted)
    assert str(err.value).startswith("unsigned" if tamper == "unsigned" else "bad signature")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o620, 0o604])
def test_a_key_others_can_read_or_write_is_one_line(key_env, mode):
    # setup
    assert signing.signing_key() is not None  # control: 0600 is fine
    key_env.chmod(mode)
    # execute
    with pytest.raises(ConfigError) as err:
        signing.signing_key()
    with pytest.raises(ConfigError) as at_parse:
        signing.configure(None)
    # assert: what, where, the fix; no key material
    line = str(err.value)
    assert line == str(at_parse.value) and "\n" not in line
    assert line.startswith(f"[stage=config key={signing.ENV_KEY_FILE}] signing key {key_env} ")
    assert f"(mode {mode:04o})" in line and line.endswith(f"Fix: chmod 600 {key_env}")
    assert "PRIVATE" not in line


def test_bad_trusted_key_line_is_one_config_error(tiny_workspace, key_env):
    # setup
    good = other_key(tiny_workspace).public_key
    raw = tiny_raw_config()
    # execute
    for bad in ("ed25519:AAAA", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO", "ed25519:not base64!"):
        raw["trust"] = {"trusted_keys": [good, bad]}
        with pytest.raises(ConfigError) as err:
            config.resolve(raw, tiny_workspace)
        # assert
        line = str(err.value)
        assert "\n" not in line and line.startswith("[stage=config key=trust.trusted_keys.1] ")
        assert "Fix: paste the `ed25519:...` line" in line
    raw["trust"] = {"trusted_keys": [good], "signing_key": "keys/me.key"}  # control
    assert config.resolve(raw, tiny_workspace)["trust"] == {
        "trusted_keys": [good], "signing_key": str((tiny_workspace / "keys/me.key").absolute())}


def test_trust_is_in_no_fingerprint(tiny_workspace, key_env):
    # setup
    raw = tiny_raw_config()
    plain = config.resolve(raw, tiny_workspace)
    # execute
    raw["trust"] = {"trusted_keys": [other_key(tiny_workspace).public_key],
                    "signing_key": "elsewhere.key"}
    trusting = config.resolve(raw, tiny_workspace)
    # assert: the model settings every fingerprint reads are the same
    assert trusting["models"] == plain["models"] and trusting["trust"] != plain["trust"]
    assert "trust" not in str(trusting["models"])


def test_default_key_is_made_on_first_use(tmp_path, monkeypatch):
    # setup: no key anywhere
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(signing.ENV_KEY_FILE, raising=False)
    monkeypatch.delenv(signing.ENV_KEY, raising=False)
    signing.configure(None)
    path = tmp_path / "home" / ".config" / "engineforge" / "signing.key"
    assert signing.local_public_key() is None and not path.exists()  # looking makes nothing
    # execute
    first = signing.signing_key()
    again = signing.signing_key()
    # assert
    assert path.is_file() and path.stat().st_mode & 0o777 == 0o600
    assert first.public_key == again.public_key == signing.local_public_key()


def test_concurrent_first_uses_make_one_key(tmp_path):
    """Parallel jobs making the default key at once: one key wins, none is replaced."""
    # setup
    path = tmp_path / "signing.key"
    barrier = threading.Barrier(8)
    made, refused = [], []

    def make():
        barrier.wait()
        try:
            made.append(signing.generate(path))
        except FileExistsError:
            refused.append(1)

    # execute
    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # assert
    assert len(made) == 1 and len(refused) == 7
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(signing.ENV_KEY, raising=False)
        mp.setenv(signing.ENV_KEY_FILE, str(path))
        assert signing.signing_key().public_key == made[0]
    assert [p.name for p in tmp_path.iterdir()] == ["signing.key"]  # no temp left


def test_a_named_key_file_that_is_missing_is_one_line(tmp_path, monkeypatch):
    # setup
    monkeypatch.delenv(signing.ENV_KEY, raising=False)
    missing = tmp_path / "nope.key"
    monkeypatch.setenv(signing.ENV_KEY_FILE, str(missing))
    # execute
    with pytest.raises(ConfigError) as err:
        signing.signing_key()
    # assert: never made up at a path the user named
    assert str(err.value) == (f"[stage=config key={signing.ENV_KEY_FILE}] signing key file "
                              f"{missing} does not exist. Fix: create one with `engineforge "
                              f"keygen --out {missing}`")
    assert not missing.exists()


def test_a_key_in_the_environment_signs_and_is_redacted(tmp_path, monkeypatch):
    # setup
    path = tmp_path / "k.key"
    public = signing.generate(path)
    pem = path.read_text()
    body = "".join(pem.splitlines()[1:-1])
    monkeypatch.setenv(signing.ENV_KEY, pem)
    monkeypatch.setenv(signing.ENV_KEY_FILE, str(tmp_path / "ignored.key"))  # the text wins
    # execute
    key = signing.signing_key()
    text = redaction.redact(f"oops: {pem} and its body {body}")
    # assert
    assert key.public_key == public
    assert body not in text and text.count("***") >= 2
    monkeypatch.delenv(signing.ENV_KEY)
    assert body in redaction.redact(body)  # control: redacted because it is the env's key


def keygen(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    return subprocess.run([sys.executable, "-m", "engineforge.cli", "keygen", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_keygen_writes_0600_and_never_overwrites_without_force(tmp_path):
    # setup
    out = tmp_path / "conf" / "team.key"
    # execute
    made = keygen("--out", str(out), cwd=tmp_path)
    before = out.read_bytes()
    again = keygen("--out", str(out), cwd=tmp_path)
    forced = keygen("--out", str(out), "--force", cwd=tmp_path)
    # assert
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(signing.ENV_KEY, raising=False)
        mp.setenv(signing.ENV_KEY_FILE, str(out))
        signing.raw_public_key(public)  # a valid key line
        assert forced.returncode == 0 and signing.signing_key().public_key == (
            forced.stdout.strip()) != public
    assert f"key id {signing.key_id(public)}" in made.stderr
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert again.stderr.startswith(f"engineforge: [stage=config key=--out] {out} exists")
    assert "--force" in again.stderr and out.stat().st_mode & 0o777 == 0o600
    assert before != out.read_bytes()  # replaced by --force only
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp left
