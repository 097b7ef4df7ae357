"""Ed25519 signatures: who built a cache entry or a release bundle, and whom to trust.

Formats (the ``cryptography`` library's Ed25519):

- private key: PEM, PKCS8, unencrypted, in a file only its owner may read (0600);
- public key: ``ed25519:<base64 of the 32 raw bytes>``; key id: the first 16 hex digits of
  sha256(raw bytes);
- signature: ``{"key_id", "public_key", "signature": base64}`` beside what it signs: a cache
  entry's ``payload`` (canonical JSON), or a bundle's ``manifest.json`` (its exact bytes).

The signing key comes from ``ENGINEFORGE_SIGNING_KEY`` (the PEM text), else the file named by
``ENGINEFORGE_SIGNING_KEY_FILE``, else the config's ``trust.signing_key``, else
``~/.config/engineforge/signing.key`` (made on first use). Trusted: the config's
``trust.trusted_keys`` and the builder's own key. Neither is part of any fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, ValidationError

from engineforge.errors import ConfigError
from engineforge.settings import Section
from engineforge.sidecar import canonical_json, writer

log = logging.getLogger(__name__)

ENV_KEY = "ENGINEFORGE_SIGNING_KEY"
ENV_KEY_FILE = "ENGINEFORGE_SIGNING_KEY_FILE"
PREFIX = "ed25519:"
KEYGEN_FIX = "create one with `engineforge keygen --out {path}`"


class Trust(Section):
    trusted_keys: list[str] = Field(
        default_factory=list, description="Public keys (`ed25519:<base64>`, printed by "
        "`engineforge keygen`) whose signed cache entries are restored and whose release "
        "bundles verify. The builder's own key is always trusted.")
    signing_key: str | None = Field(
        None, description="This builder's private key file (PEM, mode 0600). Default: "
        "~/.config/engineforge/signing.key, made on first use. The environment wins: "
        "ENGINEFORGE_SIGNING_KEY (the PEM text), ENGINEFORGE_SIGNING_KEY_FILE (a path).")


class Untrusted(Exception):
    """A signature that is not accepted; the message is the reason (one line)."""


# -- public keys ----------------------------------------------------------------------------
def public_key_line(raw: bytes) -> str:
    return PREFIX + base64.b64encode(raw).decode()


def raw_public_key(line: str) -> bytes:
    """The 32 raw bytes of an ``ed25519:<base64>`` line (ValueError otherwise)."""
    if not isinstance(line, str) or not line.startswith(PREFIX):
        raise ValueError(f"does not start with '{PREFIX}'")
    try:
        raw = base64.b64decode(line[len(PREFIX):].strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"holds {len(raw)} bytes, an Ed25519 public key 32")
    return raw


def key_id(public_key: str) -> str:
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()[:16]


# -- trust (the config's `trust:` section; every process configures it at parse) -----------
_trust = Trust()


def parse_trust(raw: dict | None, root: str | os.PathLike = ".") -> dict:
    """The ``trust`` section validated: public keys normalised, the key path absolute (a
    relative one resolves in ``root``). One ConfigError line names a bad key."""
    try:
        trust = Trust(**(raw or {}))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, ("trust", *first["loc"])))
        raise ConfigError(f"invalid config at '{where}': {first['msg']}.", key=where,
                          fix="see `engineforge schema` (trust)") from None
    keys = []
    for i, line in enumerate(trust.trusted_keys):
        try:
            keys.append(public_key_line(raw_public_key(line.strip())))
        except ValueError as err:
            raise ConfigError(f"trusted key {line[:60]!r} is not an Ed25519 public key line: "
                              f"it {err}.", key=f"trust.trusted_keys.{i}",
                              fix="paste the `ed25519:...` line `engineforge keygen` printed"
                              ) from None
    path = trust.signing_key
    if path:
        path = str((Path(root) / Path(path).expanduser()).absolute())
    return {"trusted_keys": keys, "signing_key": path}


def configure(trust: dict | None) -> None:
    """Use this resolved ``trust`` section in this process (``config.resolve``'s
    ``EF["trust"]``). A key file others may read is refused now, not at the first upload."""
    global _trust
    _trust = Trust(**(trust or {}))
    where, path = _key_source()
    if path is not None and path.exists():
        _check_permissions(path, where)


def trusted() -> set[str]:
    """Public key lines trusted here: the configured ones and this builder's own."""
    own = local_public_key()
    return set(_trust.trusted_keys) | ({own} if own else set())


# -- the private key ------------------------------------------------------------------------
def default_key_path() -> Path:
    return Path.home() / ".config" / "engineforge" / "signing.key"


def _key_source() -> tuple[str, Path | None]:
    """(where the key comes from, its file or None for the PEM text in the environment)."""
    if os.environ.get(ENV_KEY):
        return ENV_KEY, None
    if os.environ.get(ENV_KEY_FILE):
        return ENV_KEY_FILE, Path(os.environ[ENV_KEY_FILE]).expanduser()
    if _trust.signing_key:
        return "trust.signing_key", Path(_trust.signing_key)
    return "trust.signing_key", default_key_path()


def _check_permissions(path: Path, where: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"signing key {path} is readable or writable by group or others "
                          f"(mode {mode:04o}).", key=where, fix=f"chmod 600 {path}")


@dataclass(frozen=True)
class SigningKey:
    private: object  # cryptography's Ed25519PrivateKey
    public_key: str
    key_id: str

    def sign(self, data: bytes) -> dict:
        """``{"key_id", "public_key", "signature"}`` over ``data``."""
        sig = self.private.sign(data)
        return {"key_id": self.key_id, "public_key": self.public_key,
                "signature": base64.b64encode(sig).decode()}

    def __repr__(self) -> str:  # never the private key
        return f"SigningKey({self.key_id})"


def _from_pem(pem: bytes, where: str, path: Path | None) -> SigningKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, binascii.Error):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path or f'in ${where}'} is not an unencrypted PKCS8 "
                          "PEM Ed25519 private key.", key=where,
                          fix=KEYGEN_FIX.format(path=path or "PATH"))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    line = public_key_line(raw)
    return SigningKey(key, line, key_id(line))


def signing_key(create: bool = True) -> SigningKey | None:
    """This builder's key (see the module doc); the default file is made on first use
    (``create``; else None when there is none). Problems are one ConfigError line."""
    where, path = _key_source()
    if path is None:
        return _from_pem(os.environ[ENV_KEY].encode(), where, None)
    if not path.exists():
        if where == ENV_KEY_FILE or _trust.signing_key:  # named: never made up
            raise ConfigError(f"signing key file {path} does not exist.", key=where,
                              fix=KEYGEN_FIX.format(path=path))
        if not create:
            return None
        try:
            public = generate(path)
            log.info("created signing key %s (%s); trust it elsewhere: trust.trusted_keys: "
                     "[%s]", path, key_id(public), public)
        except FileExistsError:
            pass  # another job made it first: use that one
    _check_permissions(path, where)
    try:
        pem = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"signing key {path} cannot be read: {err.strerror or err}.",
                          key=where, fix="check the path and its owner") from None
    return _from_pem(pem, where, path)


def local_public_key() -> str | None:
    """This builder's public key, or None when it has none yet (nothing is created)."""
    try:
        key = signing_key(create=False)
    except ConfigError:
        return None
    return key.public_key if key else None


def generate(path: str | os.PathLike, force: bool = False) -> str:
    """Write a new private key to ``path`` (mode 0600: temporary file, then linked into
    place, so an existing key is never replaced unless ``force``); returns its public key
    line. FileExistsError when ``path`` exists and not ``force``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path).expanduser()
    if path.exists() and not force:
        raise FileExistsError(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer()}.", suffix=".tmp",
                               dir=path.parent)  # mkstemp: 0600 from the start
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if a key appeared meanwhile: never overwritten
    finally:
        Path(tmp).unlink(missing_ok=True)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return public_key_line(raw)


# -- signatures -----------------------------------------------------------------------------
def verify(data: bytes, signature: dict | None, trusted_keys: set[str]) -> str:
    """The key id that signed ``data``; Untrusted("unsigned" | "signed by untrusted key
    <id>" | "bad signature") otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(signature, dict) or not signature.get("signature"):
        raise Untrusted("unsigned")
    try:
        raw = raw_public_key(signature.get("public_key"))
    except ValueError:
        raise Untrusted("bad signature (its public key is not an Ed25519 key line)") from None
    line, kid = public_key_line(raw), hashlib.sha256(raw).hexdigest()[:16]
    if line not in trusted_keys:
        raise Untrusted(f"signed by untrusted key {kid}")
    if signature.get("key_id") != kid:
        raise Untrusted("bad signature (key id differs from its public key)")
    try:
        sig = base64.b64decode(signature["signature"], validate=True)
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, data)
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        raise Untrusted("bad signature") from None
    return kid


def sign_entry(payload: dict, key: SigningKey | None = None) -> dict:
    """A cache entry's signature document: ``{payload, key_id, public_key, signature}``."""
    key = key or signing_key()
    return {"payload": payload, **key.sign(canonical_json(payload).encode())}


def open_entry(doc, trusted_keys: set[str]) -> dict:
    """The payload of a signature document made by :func:`sign_entry`, if a trusted key
    signed it (Untrusted otherwise)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("payload"), dict):
        raise Untrusted("unsigned")
    verify(canonical_json(doc["payload"]).encode(), doc, trusted_keys)
    return doc["payload"]
