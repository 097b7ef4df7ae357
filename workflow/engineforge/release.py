"""Release bundles: selected engines + their sidecars + a manifest, and their registration.

``release`` picks built engines from the artifacts tree by ``model/precision/profile/backend``
patterns, registers each tracked one in the MLflow Model Registry, then writes
``engineforge-<version>.tar.gz`` (temp file + rename). The manifest carries each engine's
provenance (where its stages ran, fingerprints, tool versions) and ``manifest.sig.json``
signs its exact bytes with the builder's key (``signing``). ``verify`` checks that signature
against the trusted keys, re-hashes the bundle against its manifest without extracting it,
and checks the provenance against the engines. Nothing here imports torch or ONNX.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from engineforge import config as efconfig
from engineforge import mlflow_store, signing
from engineforge.backends import backend_class
from engineforge.backends import names as backend_names
from engineforge.errors import ReleaseError
from engineforge.layout import Layout
from engineforge.redaction import redact
from engineforge.results import AuditResult, BenchResult
from engineforge.sidecar import atomic_path, read_json, sha256_file

REPO = Path(__file__).resolve().parents[2]  # the checkout the workflow runs from
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig.json"  # {signed, sha256, key_id, public_key, signature}
PROVENANCE_STAGES = ("export", "simplify", "precision", "build")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def bundle_name(version: str) -> str:
    return f"engineforge-{version}"


def registered_name(model: str, precision: str, profile: str, backend: str) -> str:
    """``engineforge.<model>.<precision>.<profile>.<backend>``; MLflow forbids '/' and ':'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"engineforge.{model}.{precision}.{profile}.{backend}")


def alias_name(alias: str) -> str:
    """MLflow aliases: [A-Za-z0-9_-] only, not 'latest', not 'v<digits>' (version aliases)."""
    safe = re.sub(r"[^\w-]", "_", alias)
    if not safe or safe.lower() == "latest" or re.fullmatch(r"[vV]\d+", safe):
        raise ReleaseError(f"'{alias}' is not a usable MLflow alias (reserved).", key="--alias",
                           fix="pick another name, e.g. release-<version> or production")
    return safe


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def engine_files() -> set[str]:
    """Engine file names of every registered backend (``Backend.artifact``)."""
    return {backend_class(b).artifact for b in backend_names()}


def _match(name: str, patterns: list[str]) -> bool:
    # "tinycls" means "tinycls/*/*/*": missing trailing parts match anything.
    full = ["/".join((p.split("/") + ["*"] * 4)[:max(4, p.count("/") + 1)]) for p in patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in full)


def built(layout: Layout) -> list[tuple[Path, dict]]:
    """(build.json, {model, backend, precision, profile}) of every build in the layout's
    tree: the layout's own build-sidecar template, globbed and parsed back."""
    template = layout.build()
    pattern, regex = glob.escape(template), re.escape(template)
    for field in ("model", "backend", "precision", "profile"):
        pattern = pattern.replace(f"{{{field}}}", "*")
        regex = regex.replace(re.escape(f"{{{field}}}"), f"(?P<{field}>[^/]+)")
    found = []
    for path in glob.glob(pattern):
        m = re.fullmatch(regex, path)
        if m:
            found.append((Path(path), m.groupdict()))
    return sorted(found, key=lambda f: f[0])


def _result(artifacts: Path, path: Path, kind):
    """(a sidecar's typed result or None when there is no sidecar, why it is unusable)."""
    if not path.is_file():
        return None, None
    try:
        return kind.model_validate(read_json(path)["result"]), None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"])) or "result"
        return None, (f"{path.relative_to(artifacts).as_posix()} is not a result of this "
                      f"version ({where}: {first['msg']}); rebuild it: `engineforge run`")


def select(artifacts: Path, models: dict, patterns: list[str], allow_failed: bool):
    """(chosen, excluded): every engine whose build.json exists, filtered and checked."""
    layout = Layout(Path(artifacts).as_posix())
    chosen, excluded = [], []
    for side, w in built(layout):
        model, backend, precision, profile = w["model"], w["backend"], w["precision"], w["profile"]
        name = f"{model}/{precision}/{profile}/{backend}"
        if not _match(name, patterns):
            continue
        registered = backend in backend_names()
        engine = Path(layout.engine(backend, model, precision, profile)) if registered else None
        build = read_json(side)
        audit_path = Path(layout.audit(model, backend, precision))
        bench_path = Path(layout.bench(model, backend, precision, profile))
        audit, bad_audit = _result(artifacts, audit_path, AuditResult)
        bench, bad_bench = _result(artifacts, bench_path, BenchResult)
        why = None
        if model not in models:
            why = "model not in the config (it could not be rebuilt)"
        elif not registered:
            why = f"backend '{backend}' is not registered (it could not be rebuilt)"
        elif not engine.is_file():
            why = "engine file missing next to build.json"
        elif sha256_file(engine) != build["outputs"].get("engine", {}).get("sha256"):
            why = "engine differs from its build.json (rebuild it: `engineforge run`)"
        elif bad_audit or bad_bench:
            why = bad_audit or bad_bench
        elif audit is not None and audit.status == "fail" and not allow_failed:
            why = (f"audit verdict 'fail' ({'; '.join(audit.failures)}); "
                   "pass --allow-failed to include it")
        if why:
            excluded.append({"engine": name, "reason": why})
        else:
            chosen.append({"name": name, "model": model, "precision": precision,
                           "profile": profile, "backend": backend, "engine": engine,
                           "build": build, "build_path": side, "audit_path": audit_path,
                           "audit": audit, "bench_path": bench_path, "bench": bench})
    return chosen, excluded


def _entry(artifacts: Path, workdir: Path, config_path: Path, c: dict, commit: str | None):
    """One engine's manifest entry; ``files`` maps bundle paths to source files."""
    a, m, p, prof, b = artifacts, c["model"], c["precision"], c["profile"], c["backend"]
    layout = Layout(Path(a).as_posix())
    q = backend_class(b).quantizer(p)  # the backend's own quantizer's graph, if any
    precision = (layout.quantized("precision.json", q, m, p) if q
                 else layout.precision("precision.json", m, p))
    sidecars = {"export": Path(layout.export("export.json", m)),
                "simplify": Path(layout.simplify("simplify.json", m)),
                "precision": Path(precision),
                "build": c["build_path"], "audit": c["audit_path"], "bench": c["bench_path"],
                "localise": Path(layout.localise(m, p))}
    sidecars = {k: v for k, v in sidecars.items() if v.is_file()}
    rel = lambda f: f.relative_to(a).as_posix()  # path inside the bundle
    files = {rel(f): f for f in [c["engine"], *sidecars.values()]}
    drift_path = Path(layout.drift("json", m))
    rows = read_json(drift_path)["rows"] if drift_path.is_file() else []
    drift = next((r for r in rows if r["precision"] == p and r["backend"] == b), {})
    audit: AuditResult | None = c["audit"]
    bench: BenchResult | None = c["bench"]
    opt = bench.points.get("opt") if bench else None
    track_path = Path(layout.track(m))
    track = read_json(track_path) if track_path.is_file() else {}
    target = os.path.relpath(c["engine"].resolve(), workdir.resolve())
    # profiles/default next to the Snakefile is the workflow profile: snakemake picks it up
    snake = ".venv/bin/snakemake --cores all"
    if config_path.resolve() != REPO / "config.yaml":
        snake += f" --configfile {config_path.resolve()}"
    if workdir.resolve() != REPO:
        snake += f" --directory {workdir.resolve()}"
    entry = {
        "name": c["name"], "model": m, "precision": p, "profile": prof, "backend": b,
        "path": rel(c["engine"]), "sha256": c["build"]["outputs"]["engine"]["sha256"],
        "bytes": c["engine"].stat().st_size,
        "sidecars": {k: rel(v) for k, v in sidecars.items()},
        "fingerprints": {k: read_json(sidecars[k])["fingerprint"]
                         for k in ("export", "simplify", "precision", "build") if k in sidecars},
        "tools": c["build"]["tools"], "device": c["build"]["device"],
        "audit": {"verdict": audit.status if audit else "n/a",
                  "reason": audit.reason if audit else None,
                  "drift": {k: v for k, v in drift.items()
                            if k not in ("precision", "backend", "status", "reason")}},
        "bench": {"p50_ms_opt": opt.p50_ms if opt else None},
        **_repair(sidecars.get("precision")),
        "mlflow": {"record_id": track.get("record_id"), "tracking": track.get("status"),
                   "run_id": (track.get("children") or {}).get(c["name"])},
        "rebuild": [f"git checkout {commit or '<commit unknown: no git checkout>'}",
                    "make env", f"{snake} {target}"],
    }
    return entry, files


def _repair(precision_sidecar: Path | None) -> dict:
    """A repaired variant's entry: what it keeps in high precision, and why."""
    if precision_sidecar is None:
        return {}
    repair = read_json(precision_sidecar)["result"].get("extra", {}).get("repair")
    return {"repair": {k: repair.get(k) for k in ("status", "from", "excluded_nodes")}
            } if repair else {}


def _provenance(artifacts: Path, entry: dict) -> dict:
    """Where an engine's export, simplify, precision and build ran (host, Slurm job: the
    sidecars' ``ran``), their fingerprints and tool versions."""
    ran, tools = {}, {}
    for stage in PROVENANCE_STAGES:
        if stage in entry["sidecars"]:
            side = read_json(Path(artifacts) / entry["sidecars"][stage])
            where = side.get("ran") or {}
            ran[stage] = {k: where.get(k) for k in ("host", "slurm_job_id")}
            tools[stage] = side.get("tools", {})
    return {"ran": ran, "fingerprints": dict(entry["fingerprints"]), "tools": tools}


def _drift_rows(artifacts: Path, model: str) -> list[dict]:
    """Every row of the model's drift matrix (``audit/drift.json``), [] when there is none."""
    path = Path(Layout(Path(artifacts).as_posix()).drift("json", model))
    return read_json(path)["rows"] if path.is_file() else []


def _run_ids_by_record(client, experiment: str, record_id: str) -> dict:
    """Child run ids of an uploaded record (track.json lacks them after `sync` or a reuse)."""
    exp = client.get_experiment_by_name(experiment)
    if not exp or not record_id:
        return {}
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`{mlflow_store.RECORD_TAG}.parent` = '{record_id}'",
                              max_results=1000)
    return {r.info.run_name: r.info.run_id for r in runs}


def _engine_source(client, run_id: str, engine_file: str, size: int) -> tuple[str, str]:
    """(source URI, run holding it): ``runs:/<id>/build`` (engine + build.json), the run an
    ``engineforge.ref.build`` tag points to (unchanged engines are logged once), or, for
    older runs, the engine at the run's root."""
    ref = client.get_run(run_id).data.tags.get(mlflow_store.REF_TAG + ".build")
    if ref:
        run_id = ref.split("/")[1]  # runs:/<id>/build
    for sub in ("build", None):
        arts = client.list_artifacts(run_id, sub) if sub else client.list_artifacts(run_id)
        found = {PurePosixPath(x.path).name: x for x in arts if not x.is_dir}
        if engine_file in found:
            if found[engine_file].file_size not in (None, size):
                raise ReleaseError(f"MLflow run {run_id} holds another {engine_file} "
                                   f"({found[engine_file].file_size} bytes, not {size}).",
                                   key="track.json", fix="rerun tracking: delete the model's "
                                   "track.json and run `engineforge run`")
            return (f"runs:/{run_id}/build" if sub else f"runs:/{run_id}/{engine_file}",
                    run_id)
    raise ReleaseError(f"MLflow run {run_id} has no {engine_file} artifact.", key="track.json",
                       fix="delete the model's track.json and run `engineforge run`")


def register(entries: list[dict], version: str, alias: str, experiment: str, say) -> None:
    """One registered model per engine, a new version from its child run, alias -> version."""
    from mlflow.exceptions import MlflowException

    uri = mlflow_store.tracking_uri()
    client = mlflow_store.client()  # the registry follows the tracking URI
    name = None
    try:
        for e in entries:
            m = e["mlflow"]
            if not m["run_id"] and m["record_id"]:  # uploaded later by `sync`, or reused
                ids = _run_ids_by_record(client, experiment, m["record_id"])
                m["run_id"] = ids.get(e["name"])
            if not m["run_id"]:
                say(f"not registered {e['name']}: no MLflow run (run `engineforge sync`)")
                continue
            name = registered_name(e["model"], e["precision"], e["profile"], e["backend"])
            source, source_run = _engine_source(client, m["run_id"],
                                                PurePosixPath(e["path"]).name, e["bytes"])
            try:
                client.get_registered_model(name)
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                client.create_registered_model(
                    name, tags={"engineforge.model": e["model"]},
                    description=f"engineforge engine {e['name']}")
            tags = {"engineforge.release": version, "engineforge.sha256": e["sha256"],
                    "engineforge.run_id": m["run_id"],  # this release's run (the gate's)
                    "engineforge.fingerprint.build": e["fingerprints"].get("build", ""),
                    "engineforge.audit": e["audit"]["verdict"], "engineforge.name": e["name"]}
            mv = client.create_model_version(name, source, run_id=source_run, tags=tags,
                                             description=f"engineforge release {version}")
            client.set_registered_model_alias(name, alias, mv.version)
            client.set_tag(m["run_id"], "engineforge.release", version)  # gate: tag:...
            m.update(registered_model=name, version=str(mv.version), alias=alias, source=source)
            say(f"registered {name} version {mv.version} (alias {alias})")
    except ReleaseError:
        raise
    except Exception as err:  # noqa: BLE001 - any registry failure fails the release
        first = redact((str(err).strip().splitlines() or [type(err).__name__])[0])
        raise ReleaseError(f"registering {name or 'engines'} at {redact(uri)} failed: "
                           f"{first[:300]}; no archive written.", key="MLFLOW_TRACKING_URI",
                           fix="check the tracking server, or pass --no-register") from None


def _add(tar: tarfile.TarFile, arcname: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))  # uid/gid 0, no user names: reproducible members


def release(version: str, *, config_path: str | Path = "config.yaml",
            artifacts: str | Path | None = None, out: str | Path | None = None,
            patterns: list[str] | None = None, alias: str | None = None, register_models=True,
            allow_failed=False, force=False, say=print,
            workdir: str | Path | None = None) -> dict:
    """Cut a release; returns {"bundle": path, "manifest": dict}. ``workdir``: the directory
    the workflow ran in, where the config's paths and artifacts resolve (Snakemake's
    ``--directory``); default: the config's directory."""
    if not VERSION_RE.match(version):
        raise ReleaseError(f"version '{version}' is not a file-name-safe string.", key="version",
                           fix="use letters, digits and . _ + - (e.g. 1.2.0)")
    alias = alias_name(alias or f"release-{version}")
    config_path = Path(config_path)
    workdir = config_path.parent if workdir is None else Path(workdir)
    cfg = efconfig.load(config_path, root=workdir)
    signing.configure(cfg["trust"])
    key = signing.signing_key()  # a key problem is one line before anything is registered
    artifacts = Path(artifacts) if artifacts else workdir / cfg["artifacts"]
    bundle = Path(out or artifacts / "releases") / f"{bundle_name(version)}.tar.gz"
    if bundle.exists() and not force:
        raise ReleaseError(f"release {version} already exists: {bundle}.", key="version",
                           fix="bump the version, or pass --force to replace it")
    patterns = patterns or ["*/*/*/*"]
    chosen, excluded = select(artifacts, cfg["models"], patterns, allow_failed)
    for x in excluded:
        say(f"excluded {x['engine']}: {x['reason']}")
    if not chosen:
        raise ReleaseError(f"no built engine under {artifacts} matches {' '.join(patterns)}"
                           f" ({len(excluded)} excluded).", key="--select",
                           fix="check the pattern (model/precision/profile/backend), build "
                               "first (`engineforge run`), or pass --directory: where the run "
                               "was started (default: the config's directory)")
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    entries, files = [], {}
    for c in chosen:
        entry, f = _entry(artifacts, workdir, config_path, c, commit)
        entries.append(entry)
        files.update(f)
    if register_models:  # before the archive: a failed registration leaves no bundle
        register(entries, version, alias, cfg["experiment"], say)
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    used = sorted({e["model"] for e in entries})
    manifest = {
        "format": 1, "version": version, "created": created.isoformat().replace("+00:00", "Z"),
        "git": {"commit": commit, "dirty": dirty},
        "tracking_uri": redact(mlflow_store.tracking_uri()) if register_models else None,
        "alias": alias if register_models else None,
        "config": {"path": str(config_path), "experiment": cfg["experiment"],
                   "models": {m: cfg["models"][m] for m in used}},
        "engines": entries, "excluded": excluded,
        "drift": {m: _drift_rows(artifacts, m) for m in used},  # what a baseline gate reads
        "files": {p: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                  for p, f in sorted(files.items())},
        "provenance": {"builder": {"key_id": key.key_id, "public_key": key.public_key},
                       "engines": {e["name"]: _provenance(artifacts, e) for e in entries}},
    }
    data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    sig = {"signed": MANIFEST, "sha256": hashlib.sha256(data).hexdigest(), **key.sign(data)}
    root, mtime = bundle_name(version), int(created.timestamp())
    with atomic_path(bundle) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, f"{root}/{MANIFEST}", data, mtime)
        _add(tar, f"{root}/{SIGNATURE}", json.dumps(sig, indent=2, sort_keys=True).encode(),
             mtime)
        for path in sorted(files):  # deterministic member order
            _add(tar, f"{root}/{path}", files[path].read_bytes(), mtime)
    return {"bundle": bundle, "manifest": manifest}


def _safe(name: str) -> bool:
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in name


def _read(tar: tarfile.TarFile, problems: list[str]) -> tuple[dict[str, bytes], dict]:
    """({manifest.json / manifest.sig.json: bytes}, {other path below the bundle root:
    (sha256, bytes)}), streaming each member."""
    signed, seen = {}, {}
    for member in tar.getmembers():
        if not _safe(member.name) or not (member.isfile() or member.isdir()):
            problems.append(f"unsafe member {member.name!r} (absolute, '..' or a link)")
            continue
        parts = PurePosixPath(member.name).parts
        rel = "/".join(parts[1:]) or member.name
        if not member.isfile():
            continue
        if rel in (MANIFEST, SIGNATURE):
            signed[rel] = tar.extractfile(member).read()
            continue
        if rel in seen:
            problems.append(f"duplicate member {rel}")
        digest = hashlib.file_digest(tar.extractfile(member), "sha256").hexdigest()
        seen[rel] = (digest, member.size)
    return signed, seen


def _signer(data: bytes, sig_data: bytes | None, trusted: set[str]) -> tuple[dict | None, str]:
    """(the signature of manifest.json's bytes if a trusted key made it, else None; the
    problem, one line)."""
    if sig_data is None:
        return None, f"unsigned bundle: no {SIGNATURE}"
    try:
        sig = json.loads(sig_data)
        signing.verify(data, sig, trusted)
    except ValueError as err:
        return None, f"{SIGNATURE} is not valid JSON: {err}"
    except signing.Untrusted as err:
        if str(err) == "unsigned":
            return None, f"unsigned bundle: {SIGNATURE} holds no signature"
        if str(err).startswith("signed by untrusted key"):
            return None, (f"{MANIFEST} {err}: pass --trusted-key ed25519:... or add it to "
                          "trust.trusted_keys (--configfile)")
        return None, f"{MANIFEST} does not match its signature ({err}): edited after signing"
    if sig.get("sha256") != hashlib.sha256(data).hexdigest():
        return None, f"{MANIFEST} does not match its signature (sha256): edited after signing"
    return sig, ""


def _provenance_problems(manifest: dict, sig: dict) -> list[str]:
    """Every engine has provenance with its own fingerprints, under the signer's name."""
    prov = manifest.get("provenance")
    if not isinstance(prov, dict):
        return ["provenance missing from the manifest"]
    problems = []
    builder = (prov.get("builder") or {}).get("public_key")
    if builder != sig["public_key"]:
        problems.append(f"provenance names builder {str(builder)[:60]}, the bundle is signed by "
                        f"key {sig['key_id']}")
    engines = prov.get("engines") or {}
    for e in manifest.get("engines", []):
        p = engines.get(e["name"])
        if not isinstance(p, dict):
            problems.append(f"provenance missing for engine {e['name']}")
        elif p.get("fingerprints") != e.get("fingerprints"):
            problems.append(f"provenance of engine {e['name']}: its fingerprints differ from "
                            "the engine's")
    return problems


def verify(bundle: str | Path, extract_to: str | Path | None = None,
           trusted_keys: set[str] | None = None) -> tuple[int, list[str]]:
    """(engines in the manifest, problems). Checks the signature (``trusted_keys``, default
    ``signing.trusted()``), then every hash, then the provenance. Nothing is written unless
    the bundle is clean."""
    problems: list[str] = []
    trusted = signing.trusted() if trusted_keys is None else set(trusted_keys)
    try:
        tar = tarfile.open(bundle, "r:gz")
    except (OSError, tarfile.TarError) as err:
        raise ReleaseError(f"cannot read {bundle}: {err}.", key="bundle",
                           fix="pass an engineforge-<version>.tar.gz") from None
    with tar:
        try:
            signed, seen = _read(tar, problems)
        except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
            return 0, problems + [f"corrupt archive: {err}"]
        if MANIFEST not in signed:
            return 0, problems + [f"no readable {MANIFEST} in the bundle"]
        sig, problem = _signer(signed[MANIFEST], signed.get(SIGNATURE), trusted)
        if sig is None:  # nothing an untrusted manifest says is worth checking
            return 0, [problem] + problems
        try:
            manifest = json.loads(signed[MANIFEST])
        except ValueError as err:
            return 0, problems + [f"{MANIFEST} is not valid JSON: {err}"]
        listed = manifest.get("files", {})
        engines = {e["path"]: e for e in manifest.get("engines", [])}
        engine_names = engine_files()
        for rel, want in sorted(listed.items()):
            got = seen.get(rel)
            if got is None:
                problems.append(f"missing {rel}")
            elif got != (want["sha256"], want["bytes"]):
                problems.append(f"sha256 mismatch {rel}: manifest {want['sha256'][:12]}…, "
                                f"file {got[0][:12]}… ({got[1]} bytes)")
        for rel in sorted(seen):
            if rel not in listed:
                problems.append(f"not in the manifest: {rel}")
            elif PurePosixPath(rel).name in engine_names and rel not in engines:
                problems.append(f"engine file not among the manifest's engines: {rel}")
        for rel, e in sorted(engines.items()):
            if listed.get(rel, {}).get("sha256") != e["sha256"]:
                problems.append(f"engine {e['name']}: its sha256 differs from the files list")
        problems += _provenance_problems(manifest, sig)
        if extract_to and not problems:
            tar.extractall(extract_to, filter="data")  # the stdlib's safe extraction filter
    return len(engines), problems
