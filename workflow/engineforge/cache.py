"""MLflow as a shared build cache.

Every tracked stage output carries the tag ``engineforge.cache.<group> =
<fingerprint>`` (groups: ``export``, ``simplify``, ``precision.<p>``, ``build``)
and its files under the artifact directory ``<group with / for .>``. Before a
stage works, it asks the tracking server for a FINISHED run with its
fingerprint; on a hit it downloads the files, checks every sha256 against the
downloaded sidecar, and moves them into place instead of rebuilding. A fresh
clone on another machine thereby reuses what CI or a colleague already built.
Lookups never fail a build: an unreachable server is a miss.

``ENGINEFORGE_CACHE=0`` turns lookups off.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from engineforge.errors import first_line
from engineforge.sidecar import atomic_path, read_json, scratch_prefix, sha256_file, write_json

log = logging.getLogger(__name__)
_unreachable: dict[str, str] = {}  # tracking URI -> first error: stop asking it in this process


def enabled() -> bool:
    return os.environ.get("ENGINEFORGE_CACHE", "1") not in ("0", "false", "no")


def _client():
    from mlflow.tracking import MlflowClient

    from engineforge.tracking import quick_failing_http, tracking_uri

    quick_failing_http()
    return MlflowClient(tracking_uri=tracking_uri())


def lookup(group: str, fingerprint: str) -> str | None:
    """Run id of a finished run holding ``group`` with this fingerprint, or None."""
    from engineforge.tracking import find_holder, tracking_uri

    if not enabled() or tracking_uri() in _unreachable:
        return None
    try:
        client = _client()
        return find_holder(client, group, fingerprint,
                           [e.experiment_id for e in client.search_experiments()])
    except Exception as err:  # noqa: BLE001 - the cache is an optimisation, never a failure
        _unreachable[tracking_uri()] = first_line(err, 200, typed=False)
        log.warning("cache lookup for %s failed; no more lookups in this run: %s", group,
                    _unreachable[tracking_uri()])
        return None


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
            local = Path(_client().download_artifacts(run_id, artifact_dir, tmp))
            side = read_json(local / Path(sidecar_path).name)
            if side["fingerprint"] != fingerprint:
                raise ValueError("fingerprint differs from the tag")
            for role in outputs:
                rec = side["outputs"][role]
                src = local / Path(rec["path"]).name
                if sha256_file(src) != rec["sha256"]:
                    raise ValueError(f"sha256 mismatch for {src.name}")
            for role, dest in outputs.items():
                with atomic_path(dest) as part:
                    shutil.copyfile(local / Path(side["outputs"][role]["path"]).name, part)
                side["outputs"][role]["path"] = str(dest)
                side["outputs"][role]["mtime_ns"] = os.stat(dest).st_mtime_ns  # this copy's
            side["cache"] = {"hit": True, "run_id": run_id, "group": group}
            write_json(sidecar_path, side)
    except Exception as err:  # noqa: BLE001
        log.warning("cache hit for %s in run %s unusable, rebuilding: %s", group, run_id,
                    first_line(err, 200, typed=False))
        return False
    log.info("cache hit: %s restored from MLflow run %s (fingerprint %s)", group, run_id,
             fingerprint[:12])
    return True
