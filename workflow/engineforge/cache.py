"""MLflow as a shared build cache a team can trust.

Every tracked stage output carries the tag ``engineforge.cache.<group> =
<fingerprint>`` (groups: ``export``, ``simplify``, ``precision.<p>``, ``build``)
and its files under the artifact directory ``<group with / for .>``, with
``entry.sig.json``: the files' sha256, signed by the builder (``mlflow_store``). Before a
stage works, it asks the tracking server for a FINISHED run with its fingerprint; on a hit
it downloads the files and installs them only if the entry is signed by a trusted key
(``signing.trusted``: the config's ``trust.trusted_keys`` and this builder's own key), for
this group and fingerprint, and every file is the one signed. Anything else is a miss with
one warning line (the run, the group, why) and the stage rebuilds. A fresh clone on another
machine thereby reuses what CI or a colleague built, and nothing else. Lookups never fail a
build: an unreachable server is a miss.

``ENGINEFORGE_CACHE=0`` turns lookups off.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from engineforge import mlflow_store, signing
from engineforge.errors import first_line
from engineforge.sidecar import (
    atomic_path,
    read_json,
    scratch_prefix,
    sha256_file,
    write_json,
)

log = logging.getLogger(__name__)
_unreachable: dict[str, str] = {}  # tracking URI -> first error: stop asking it in this process


def enabled() -> bool:
    return os.environ.get("ENGINEFORGE_CACHE", "1") not in ("0", "false", "no")


def lookup(group: str, fingerprint: str) -> str | None:
    """Run id of a finished run holding ``group`` with this fingerprint, or None: one whose
    signature tag names a trusted key first, else any (whose entry then says why not)."""
    if not enabled() or mlflow_store.tracking_uri() in _unreachable:
        return None
    try:
        client = mlflow_store.client()
        exps = [e.experiment_id for e in client.search_experiments()]
        ids = mlflow_store.trusted_ids()
        return (mlflow_store.find_holder(client, group, fingerprint, exps, ids)
                or mlflow_store.find_holder(client, group, fingerprint, exps))
    except Exception as err:  # noqa: BLE001 - the cache is an optimisation, never a failure
        uri = mlflow_store.tracking_uri()
        _unreachable[uri] = first_line(err, 200, typed=False)
        log.warning("cache lookup for %s failed; no more lookups in this run: %s", group,
                    _unreachable[uri])
        return None


class _Refused(Exception):
    """A cache entry that is not installed; the message is the reason."""


def _check_entry(local: Path, group: str, fingerprint: str) -> str:
    """The downloaded group directory ``local``, checked against its signature: trusted
    signer, this group and fingerprint, and exactly the signed files. Returns the key id."""
    sig = local / mlflow_store.SIGNATURE
    if not sig.is_file():
        raise _Refused("unsigned")
    try:
        doc = read_json(sig)
        payload = signing.open_entry(doc, signing.trusted())
    except ValueError:
        raise _Refused(f"{mlflow_store.SIGNATURE} is not valid JSON") from None
    except signing.Untrusted as err:
        raise _Refused(str(err)) from None
    if payload.get("group") != group or payload.get("fingerprint") != fingerprint:
        raise _Refused(f"signed for {payload.get('group')} {str(payload.get('fingerprint'))[:12]}"
                       f", not {group} {fingerprint[:12]}")
    signed = payload.get("files") or {}
    # only this directory's own files: a nested directory is another group's entry
    here = {p.name: p for p in local.iterdir() if p.is_file() and p.name != sig.name}
    for name in sorted(set(here) | set(signed)):
        if name not in here:
            raise _Refused(f"{name} is missing from the entry")
        if name not in signed:
            raise _Refused(f"{name} is not in the signed entry")
        if sha256_file(here[name]) != signed[name]:
            raise _Refused(f"{name} sha256 differs from the signed entry")
    return doc["key_id"]


def restore(group: str, fingerprint: str, outputs: dict[str, Path], sidecar_path: Path) -> bool:
    """Fetch ``group``'s files from the cache into ``outputs`` + ``sidecar_path``.

    ``outputs`` maps the sidecar's output roles to where this run wants them.
    Returns False (and leaves nothing behind) on a miss or any mismatch.
    """
    run_id = lookup(group, fingerprint)
    if run_id is None:
        return False
    artifact_dir = group.replace(".", "/")
    try:
        with tempfile.TemporaryDirectory(prefix=scratch_prefix(),
                                         dir=Path(sidecar_path).parent.parent) as tmp:
            local = Path(mlflow_store.client().download_artifacts(run_id, artifact_dir, tmp))
            signer = _check_entry(local, group, fingerprint)
            side = read_json(local / Path(sidecar_path).name)
            if side["fingerprint"] != fingerprint:
                raise _Refused("the sidecar's fingerprint differs from the tag")
            for role in outputs:
                rec = side["outputs"][role]
                src = local / Path(rec["path"]).name
                if sha256_file(src) != rec["sha256"]:
                    raise _Refused(f"{src.name} sha256 differs from its sidecar")
            for role, dest in outputs.items():
                with atomic_path(dest) as part:
                    shutil.copyfile(local / Path(side["outputs"][role]["path"]).name, part)
                side["outputs"][role]["path"] = str(dest)
                side["outputs"][role]["mtime_ns"] = os.stat(dest).st_mtime_ns  # this copy's
            side["cache"] = {"hit": True, "run_id": run_id, "group": group,
                             "signed_by": signer}
            write_json(sidecar_path, side)
    except Exception as err:  # noqa: BLE001 - any problem is a miss: the stage rebuilds
        why = str(err) if isinstance(err, _Refused) else first_line(err, 200, typed=False)
        log.warning("cache entry for %s in MLflow run %s not used, rebuilding: %s", group,
                    run_id, why)
        return False
    log.info("cache hit: %s restored from MLflow run %s (fingerprint %s)", group, run_id,
             fingerprint[:12])
    return True
