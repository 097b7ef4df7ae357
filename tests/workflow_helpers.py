"""Run the real Snakemake workflow (CLI, workflow profile) on a test workspace."""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
PROFILE = ROOT / "profiles" / "default"


def write_config(workspace: Path, raw: dict) -> Path:
    path = workspace / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snakemake(workspace: Path, *args: str, env: dict | None = None, cores: int = 2,
              check: bool = True, snakefile: Path = ROOT / "Snakefile"
              ) -> subprocess.CompletedProcess:
    # No --workflow-profile: Snakemake must find profiles/default next to the Snakefile itself.
    cmd = [str(SNAKEMAKE), "-s", str(snakefile), "--configfile", str(workspace / "config.yaml"),
           "--directory", str(workspace), "--cores", str(cores), *args]
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace}/mlflow.db",
                **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=workspace)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def planned_jobs(workspace: Path, env: dict | None = None) -> dict[str, int]:
    """Jobs a dry run plans, by rule ({} when there is nothing to do)."""
    counts: dict[str, int] = {}
    for rule, _ in planned_outputs(workspace, env):
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def planned_outputs(workspace: Path, env: dict | None = None) -> list[tuple[str, str]]:
    """(rule, first output) of every job a dry run plans."""
    proc = snakemake(workspace, "--dry-run", env=env)
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return []
    jobs, rule = [], None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            rule = m.group(1)
            if rule == "all":
                jobs.append((rule, ""))
            continue
        m = re.match(r"^output: (\S+?),?(?: |$)", line.strip())
        if m and rule:
            jobs.append((rule, m.group(1)))
            rule = None
    return jobs


# -- shared helpers for tests on built workspaces -----------------------------------------------
CACHE_OFF = {"ENGINEFORGE_CACHE": "0"}  # no MLflow build cache lookups (env for a run)


def copy_workspace(src: Path, dest: Path) -> Path:
    """A self-contained copy of a built workspace: every file with its mtime (Snakemake and
    the parse-time sweep see it up to date), its own ``mlflow.db`` whose artifact locations
    point into the copy."""
    import shutil
    import sqlite3

    shutil.copytree(src, dest, symlinks=True)  # copy2: mtimes kept, dirs' copystat last
    db = dest / "mlflow.db"
    if db.exists():
        stamp = os.stat(db)
        with sqlite3.connect(db) as con:
            for table, col in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
                con.execute(f"UPDATE {table} SET {col} = replace({col}, ?, ?)",
                            (str(src), str(dest)))
        con.close()
        os.utime(db, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    return dest


def rehash_sidecars(artifacts: Path, *edited: Path) -> list[Path]:
    """After a test edited outputs in place: the records of those files in every sidecar
    under ``artifacts`` get their new sha256, size and mtime (as the runner writes them).
    Returns the sidecars rewritten."""
    import json

    from engineforge.sidecar import output_record, write_json

    targets = {Path(p).resolve() for p in edited}
    changed = []
    for side in Path(artifacts).rglob("*.json"):
        try:
            data = json.loads(side.read_text())
        except ValueError:
            continue
        if not (isinstance(data, dict) and "sidecar_version" in data):
            continue
        hit = False
        for rec in data.get("outputs", {}).values():
            path = side.parent / Path(rec["path"]).name
            if path.resolve() in targets:
                rec.update({k: v for k, v in output_record(path).items() if k != "path"})
                hit = True
        if hit:
            write_json(side, data)
            changed.append(side)
    return changed


def engineforge(*args: str, cwd: Path, uri: str | None = None, env: dict | None = None,
                drop: tuple[str, ...] = (), timeout: int = 300) -> subprocess.CompletedProcess:
    """``engineforge ARGS`` (this checkout's, in a subprocess) in ``cwd``; ``uri`` sets
    MLFLOW_TRACKING_URI, ``drop`` removes variables from the environment."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "workflow"), *filter(None, [os.environ.get("PYTHONPATH")])]), **(env or {})}
    if uri:
        full["MLFLOW_TRACKING_URI"] = uri
    for var in drop:
        full.pop(var, None)
    return subprocess.run([sys.executable, "-m", "engineforge.cli", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def mlflow_client(ws_or_uri: Path | str):
    from mlflow.tracking import MlflowClient

    uri = ws_or_uri if isinstance(ws_or_uri, str) else f"sqlite:///{ws_or_uri}/mlflow.db"
    return MlflowClient(tracking_uri=uri)


def mlflow_runs(ws_or_uri: Path | str, experiment: str = "engineforge-tests",
                filter_string: str = "") -> list:
    """Every run of ``experiment`` (all pages)."""
    client = mlflow_client(ws_or_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string, max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def mlflow_children(ws_or_uri: Path | str, parent_run_id: str,
                    experiment: str = "engineforge-tests") -> list:
    """The runs whose mlflow.parentRunId is ``parent_run_id``."""
    return mlflow_runs(ws_or_uri, experiment,
                       f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


# -- release bundles -----------------------------------------------------------------------------
def job_stats(text: str) -> dict[str, int]:
    """Jobs by rule from the "Job stats" table Snakemake prints for a dry run with work."""
    block = text.split("Job stats:\n", 1)[1].split("\n\n", 1)[0]
    rows = [line.split() for line in block.splitlines()[2:]]  # after the header and ----
    return {r[0]: int(r[1]) for r in rows if r[0] != "total"}


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def rewrite(bundle: Path, change=lambda name, data: (name, data), extra=(),
            keep=lambda name: True) -> None:
    """Rewrite the tar: each member's (name, bytes) through ``change`` (those ``keep``
    keeps), then ``extra``."""
    with tarfile.open(bundle, "r:gz") as tar:
        items = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()
                 if keep(m.name)]
    with gzip.open(bundle, "wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in [change(n, d) for n, d in items] + list(extra):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# -- report pages -------------------------------------------------------------------------------
class Page(HTMLParser):
    """Every tag with its attributes, and the text, of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def imgs(self) -> list[dict]:
        return [a for t, a in self.tags if t == "img"]

    def words(self) -> str:
        """The page's text with all white space collapsed to single spaces."""
        return " ".join(" ".join(self.text).split())


class FakeClock:
    """A module's ``time`` for timing tests (``monkeypatch.setattr(module, "time", clock)``):
    it moves only when a timed call says what it cost, so timing statistics are exact on any
    machine, loaded or not."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1e3


def assert_nothing_installed(engine: Path, sidecar: Path) -> None:
    """A refused cache entry left no output, no temporary file and no scratch directory."""
    assert not engine.exists() and not sidecar.exists()
    assert [p.name for p in engine.parent.iterdir()] == []  # no temporary file either
    assert [p.name for p in engine.parent.parent.iterdir()] == ["build"]  # no scratch dir


def artifact_file(uri: str, run_id: str, rel: str) -> Path:
    """The local file of a run's artifact ``rel`` in a file-backed MLflow store."""
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient

    root = MlflowClient(uri).get_run(run_id).info.artifact_uri
    return Path(urlparse(root).path) / rel
