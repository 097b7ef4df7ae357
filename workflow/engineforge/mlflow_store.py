"""The MLflow library under the track stage, the cache, the gate and releases.

A tracking *record* (plain JSON: runs with tags, params, metrics and artifact paths) is
uploaded with ``MlflowClient`` (no fluent global state: jobs may run in threads). Uploads are
idempotent: a record whose id is already tagged on a run is not logged twice. A record the
server could not take waits in ``<artifacts>/_tracking/pending``; :func:`sync` uploads it.

Every stage output a run holds carries ``engineforge.cache.<group> = <fingerprint>`` and its
files under ``<group with / for .>/``, with ``entry.sig.json``: the files' sha256, the
fingerprint and where the work ran, signed by the uploader's key (``signing``), and the tag
``engineforge.signed.<group> = <key id>``. Files another run holds already (same group and
fingerprint, signed by a trusted key) are referenced, not sent again.

Credentials in the tracking URI (``http://user:password@host``) are handed to MLflow through
its ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` variables and MLflow gets the
URI without them (``redaction`` keeps them out of every message).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from engineforge import signing
from engineforge.errors import first_line
from engineforge.redaction import install_log_redaction, redact
from engineforge.sidecar import read_json, sha256_file

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
RECORD_TAG = "engineforge.record_id"
CACHE_TAG = "engineforge.cache"  # engineforge.cache.<group> = fingerprint of that stage output
REF_TAG = "engineforge.ref"  # engineforge.ref.<group> = runs:/<id>/<dir> holding the same files
SIGNED_TAG = "engineforge.signed"  # engineforge.signed.<group> = key id of entry.sig.json
SIGNATURE = "entry.sig.json"  # in each cache group's directory
# The MLflow 3 UI opens an untagged experiment in its GenAI view ("Traces: 0"); this tag
# (the one the UI reads) makes it open on the runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri() -> str:
    """The tracking URI MLflow is given: credentials in it (``user:password@``) move to
    MLflow's own variables ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (and
    ``MLFLOW_TRACKING_URI`` loses them), so no MLflow message can contain them. Installs
    the log redaction of this process too. A database URI (``postgresql://user:pw@...``:
    MLflow straight on the team's database) keeps them: its driver needs them there, and
    redaction still keeps them out of every message."""
    install_log_redaction()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    parts = urlsplit(uri)
    if "@" not in parts.netloc or parts.scheme not in ("http", "https"):
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    uri = urlunsplit(parts._replace(netloc=host))
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def quick_failing_http() -> None:
    """Fail within seconds, not minutes, when a tracking server is down (user env wins)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def client():
    """An ``MlflowClient`` on :func:`tracking_uri` that fails fast on a server that is down."""
    from mlflow.tracking import MlflowClient

    quick_failing_http()
    return MlflowClient(tracking_uri=tracking_uri())


def preflight() -> None:
    """Before any job (the main process): a tracking store that refuses the credentials, or
    a server whose artifact store lacks its bucket, is bad input: one line, and no job runs
    (each would build, then leave its records pending). A store that does not answer is an
    outage, not bad input: the run goes on and its records wait for ``engineforge sync``."""
    uri = tracking_uri()
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        _preflight_server(uri)
    elif scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        _preflight_database(uri)


_KEY = "MLFLOW_TRACKING_URI"


def _preflight_server(uri: str) -> None:
    import base64
    import urllib.error
    import urllib.request

    headers = {}
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    elif user := os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()

    def get(path: str) -> tuple[int, str] | None:
        req = urllib.request.Request(f"{uri.rstrip('/')}{path}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, ""
        except urllib.error.HTTPError as err:
            return err.code, err.read(2000).decode(errors="replace")
        except OSError as err:  # down or unreachable: an outage, records go pending
            log.warning("the tracking server %s does not answer (%s): records stay pending "
                        "until `engineforge sync`", redact(uri), first_line(err, 120,
                                                                           typed=False))
            return None

    answer = get("/api/2.0/mlflow/experiments/search?max_results=1")
    if answer and answer[0] in (401, 403):
        from engineforge.errors import ConfigError

        raise ConfigError(f"the tracking server {redact(uri)} refused the credentials "
                          f"(HTTP {answer[0]})", key=_KEY,
                          fix="correct the user and password (in the URI or "
                              "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD) or the token")
    # the proxied artifact store: the store's own "no such bucket" answer is a 404 (MLflow
    # maps S3's NoSuchBucket to RESOURCE_DOES_NOT_EXIST); a store that is down is not
    answer = answer and get("/api/2.0/mlflow-artifacts/artifacts?path=")
    if answer and answer[0] == 404 and (m := re.search(r"Failed to list artifacts in (\S+): ",
                                                       answer[1])):
        from engineforge.errors import ConfigError

        raise ConfigError(f"the tracking server {redact(uri)} stores artifacts in "
                          f"{m.group(1)}, whose bucket does not exist", key=_KEY,
                          fix="create the bucket, or start the server with an "
                              "--artifacts-destination whose bucket exists")


def _preflight_database(uri: str) -> None:
    import sqlalchemy

    args = {"connect_timeout": 10} if uri.startswith("postgresql") else {}
    try:
        sqlalchemy.create_engine(uri, connect_args=args).connect().close()
    except sqlalchemy.exc.OperationalError as err:
        text = str(err.orig if err.orig is not None else err)
        if not any(s in text for s in ("authentication failed", "Access denied",
                                       "does not exist", "Login failed")):
            log.warning("the tracking database %s does not answer (%s): records stay pending "
                        "until `engineforge sync`", redact(uri), first_line(text, 120,
                                                                             typed=False))
            return
        from engineforge.errors import ConfigError

        raise ConfigError(f"the tracking database {redact(uri)} refused the connection: "
                          f"{redact(first_line(text, 160, typed=False))}", key=_KEY,
                          fix="correct the user, password or database name in the URI") from None


def create_local_store() -> None:
    """Create a local sqlite tracking store that does not exist yet, once, before jobs
    start: jobs in separate processes (cluster executors) that each open a fresh database
    race MLflow's schema migration ("table _alembic_tmp_experiments already exists")."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists():
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - tracking never fails the build
        log.warning("could not create the MLflow store %s: %s", redact(uri),
                    first_line(err, 200, typed=False))


def find_holder(client, group: str, fingerprint: str, experiment_ids: list[str],
                signers: set[str] | None = None) -> str | None:
    """Run id of the newest FINISHED run holding ``group``'s files with this fingerprint, or
    None. ``signers``: key ids; only a run whose ``engineforge.signed.<group>`` tag names one
    (a hint: the cache verifies the signature itself). None: any such run.

    The one query behind both the build cache and artifact deduplication.
    """
    if not experiment_ids:
        return None
    runs = client.search_runs(experiment_ids, f"tags.`{CACHE_TAG}.{group}` = '{fingerprint}' "
                              "and attributes.status = 'FINISHED'", max_results=20,
                              order_by=["attributes.start_time DESC"])
    runs = [r for r in runs if signers is None
            or r.data.tags.get(f"{SIGNED_TAG}.{group}") in signers]
    return runs[0].info.run_id if runs else None


def trusted_ids() -> set[str]:
    """Key ids of the keys trusted here (``signing.trusted``)."""
    return {signing.key_id(k) for k in signing.trusted()}


def upload(record: dict, uri: str | None = None) -> dict:
    """Log a record to MLflow; returns {"parent": run_id, "children": {name: run_id}}."""
    from mlflow.tracking import MlflowClient

    key = signing.signing_key()  # before any run exists: a key problem is one line
    quick_failing_http()
    client = MlflowClient(tracking_uri=uri or tracking_uri())
    exp = client.get_experiment_by_name(record["experiment"])
    exp_id = exp.experiment_id if exp else client.create_experiment(record["experiment"])
    if not exp or exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    done = client.search_runs([exp_id], f"tags.`{RECORD_TAG}` = '{record['id']}'",
                              max_results=1)
    if done:
        return {"parent": done[0].info.run_id, "children": {}, "reused": True}
    exps = [e.experiment_id for e in client.search_experiments()]
    signers = trusted_ids() | {key.key_id}

    def prepared(run: dict) -> dict:
        return _sign(_dedupe(client, run, exps, signers), key)

    parent = _log_run(client, exp_id, prepared(record["parent"]), record["id"], None)
    children = {c["name"]: _log_run(client, exp_id, prepared(c), record["id"], parent)
                for c in record["children"]}
    # Tag the parent last: a crash midway leaves no "done" marker, so sync retries.
    client.set_tag(parent, RECORD_TAG, record["id"])
    return {"parent": parent, "children": children, "reused": False}


def _groups(run: dict):
    """(tag, group, artifact directory, fingerprint) of each cache group the run holds."""
    for tag, fp in run["tags"].items():
        if tag.startswith(CACHE_TAG + "."):
            group = tag[len(CACHE_TAG) + 1:]
            yield tag, group, group.replace(".", "/"), fp


def _dedupe(client, run: dict, experiment_ids: list[str], signers: set[str]) -> dict:
    """Files of a stage output already held by a finished run, signed by a trusted key, are
    referenced, not re-sent (an unsigned or foreign holder is not: this run holds and signs
    its own copy). A one-precision change then uploads that precision's files only. The
    holding run keeps the cache tag; this run gets ``engineforge.ref.<group> =
    runs:/<id>/<dir>``."""
    run = {**run, "tags": dict(run["tags"]), "artifacts": list(run["artifacts"])}
    for tag, group, folder, fp in list(_groups(run)):
        holder = find_holder(client, group, fp, experiment_ids, signers)
        if holder:
            del run["tags"][tag]
            run["tags"][f"{REF_TAG}.{group}"] = f"runs:/{holder}/{folder}"
            run["artifacts"] = [a for a in run["artifacts"] if a[1] != folder]
    return run


def _sign(run: dict, key: signing.SigningKey) -> dict:
    """``<dir>/entry.sig.json`` for each cache group the run holds: {group, fingerprint,
    files: {name: sha256} (the sidecar and every output), provenance: the sidecar's ``ran``},
    signed; and the tag ``engineforge.signed.<group> = <key id>``."""
    run = {**run, "tags": dict(run["tags"]), "texts": dict(run.get("texts") or {})}
    for _, group, folder, fp in list(_groups(run)):
        files = [Path(p) for p, d in run["artifacts"] if d == folder and Path(p).is_file()]
        payload = {"group": group, "fingerprint": fp,
                   "files": {f.name: sha256_file(f) for f in files},
                   "provenance": _sidecar(files, fp).get("ran")}
        run["texts"][f"{folder}/{SIGNATURE}"] = json.dumps(signing.sign_entry(payload, key),
                                                           indent=2, sort_keys=True)
        run["tags"][f"{SIGNED_TAG}.{group}"] = key.key_id
    return run


def _sidecar(files: list[Path], fingerprint: str) -> dict:
    """The stage sidecar among a group's files: the JSON file with its fingerprint."""
    for f in files:
        if f.suffix == ".json":
            try:
                side = read_json(f)
            except (OSError, ValueError):
                continue
            if isinstance(side, dict) and side.get("fingerprint") == fingerprint:
                return side
    return {}


def _log_run(client, exp_id: str, run: dict, record_id: str, parent: str | None) -> str:
    from mlflow.entities import Metric, Param

    tags = dict(run["tags"])
    tags["mlflow.runName"] = run["name"]
    if parent:
        tags["mlflow.parentRunId"] = parent
        tags[RECORD_TAG + ".parent"] = record_id
    start, end = run.get("span") or (None, None)
    r = client.create_run(exp_id, start_time=start, run_name=run["name"], tags=tags)
    rid = r.info.run_id
    ts = end or int(time.time() * 1000)
    try:
        client.log_batch(rid, metrics=[Metric(k, v, ts, 0) for k, v in run["metrics"].items()],
                         params=[Param(k, v) for k, v in run["params"].items()], tags=[])
        for path, artifact_dir in run["artifacts"]:
            if Path(path).is_file():
                client.log_artifact(rid, path, artifact_dir)
        for name, text in (run.get("texts") or {}).items():
            client.log_text(rid, text, name)
    except Exception:
        # half uploaded (e.g. the artifact store is down): never FINISHED, so never a cache
        # source; the record stays pending and `engineforge sync` logs a whole new run
        with contextlib.suppress(Exception):
            client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, run.get("status", "FINISHED"), end_time=end)
    return rid


def pending_dir(artifacts: str | Path) -> Path:
    return Path(artifacts) / "_tracking" / "pending"


def sync(artifacts: str | Path) -> list[dict]:
    """Upload every pending record; keep the ones that still fail."""
    results = []
    for path in sorted(pending_dir(artifacts).glob("*.json")):
        record = read_json(path)
        ids = upload(record)
        path.unlink()
        results.append({"record": path.name, **ids})
    return results
