"""The ``engineforge`` command: run the pipeline, sync tracking, cut and verify releases,
check artifacts against their sidecars, make a signing key, print the config schema.

Every :class:`EngineforgeError` becomes one line ``engineforge: <message>`` on stderr and
exit code 2; a failed ``verify`` or ``check`` exits 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from engineforge.errors import ConfigError, EngineforgeError, TrackingError

REPO = Path(__file__).resolve().parents[2]  # the checkout holding Snakefile
PROFILE = "profiles/default"  # the workflow profile, next to the Snakefile


def cmd_run(args) -> int:
    # The Snakemake 9 Python API (snakemake.api.SnakemakeApi) does not read workflow
    # profiles (only its CLI does), so hand over to the CLI: the checkout's workflow profile
    # (named, so it applies from any directory) and all cores, then the user's flags (later
    # flags win). Absolute paths: it also works outside the checkout.
    from engineforge import config

    for path, after_another in _configfiles(args.snakemake_args):  # our line, not Snakemake's
        if after_another and not Path(path).exists():  # most likely a target
            raise ConfigError(f"'{path}' follows --configfile, which takes every name after "
                              "it as a config file.",
                              fix="put targets before --configfile (or write "
                                  "--configfile=FILE)")
        config.read(path)
    exe = Path(sys.executable).with_name("snakemake")
    exe = str(exe) if exe.exists() else shutil.which("snakemake") or "snakemake"
    argv = [exe, "--workflow-profile", str(REPO / PROFILE), "--cores", "all"]
    given = set(args.snakemake_args)
    if not given & {"-s", "--snakefile"} and not any(
            Path(f).is_file() for f in ("Snakefile", "workflow/Snakefile")):
        argv += ["--snakefile", str(REPO / "Snakefile")]
    argv += [_profile_path(a, args.snakemake_args[i - 1] if i else "")
             for i, a in enumerate(args.snakemake_args)]
    os.execvp(argv[0], argv)
    return 0  # not reached


def _profile_path(arg: str, previous: str) -> str:
    """A ``--workflow-profile`` named as in the docs (``profiles/slurm``) is the checkout's
    when no such directory is here (engineforge run from another directory)."""
    if previous == "--workflow-profile" and not Path(arg).exists() and (REPO / arg).is_dir():
        return str(REPO / arg)
    return arg


def _configfiles(argv: list[str]) -> list[tuple[str, bool]]:
    """The files given with --configfile/--configfiles (several may follow one flag), each
    with whether it follows another name after the same flag."""
    files, taking = [], 0
    for arg in argv:
        if arg in ("--configfile", "--configfiles"):
            taking = 1
        elif arg.startswith(("--configfile=", "--configfiles=")):
            files.append((arg.split("=", 1)[1], False))
            taking = 0
        elif taking and not arg.startswith("-"):
            files.append((arg, taking > 1))
            taking += 1
        else:
            taking = 0
    return files


def cmd_sync(args) -> int:
    from engineforge import mlflow_store
    from engineforge.layout import Layout
    from engineforge.redaction import redact

    try:
        results = mlflow_store.sync(args.artifacts)
    except EngineforgeError:
        raise
    except Exception as err:  # noqa: BLE001 - the server is still unreachable
        first = redact((str(err).strip().splitlines() or [type(err).__name__])[0])
        raise TrackingError(f"upload to {redact(mlflow_store.tracking_uri())} failed: "
                            f"{first[:300]}; pending records kept.", key="MLFLOW_TRACKING_URI",
                            fix="check that the tracking server is up, then rerun "
                                "`engineforge sync`") from None
    if not results:
        print(f"nothing pending under {Layout(args.artifacts).pending_dir()}")
    for r in results:
        what = ("already logged" if r.get("reused")
                else f"{len(r.get('children') or {})} child run(s)")
        print(f"uploaded {r['record']}: parent run {r['parent']} ({what})")
    return 0


def cmd_release(args) -> int:
    from engineforge import release

    out = release.release(
        args.version, config_path=args.config, artifacts=args.artifacts, out=args.out,
        patterns=args.select, alias=args.alias, register_models=not args.no_register,
        allow_failed=args.allow_failed, force=args.force, workdir=args.directory)
    engines = out["manifest"]["engines"]
    size = out["bundle"].stat().st_size / 2**20
    print(f"wrote {out['bundle']} ({len(engines)} engine(s), {size:.2f} MiB)")
    for e in engines:
        print(f"  {e['name']}  sha256={e['sha256'][:16]}  audit={e['audit']['verdict']}")
    return 0


def cmd_schema(args) -> int:
    import json

    import yaml

    from engineforge import config

    doc = config.schema()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100), end="")
    return 0


def cmd_verify(args) -> int:
    from engineforge import config, release, signing

    if args.configfile:  # its trust section: trusted keys, this builder's key
        path = Path(args.configfile)
        signing.configure(signing.parse_trust(config.read(path).get("trust"), path.parent))
    extra = set()
    for line in args.trusted_key:
        try:
            extra.add(signing.public_key_line(signing.raw_public_key(line.strip())))
        except ValueError as err:
            raise ConfigError(f"--trusted-key {line[:60]!r} is not an Ed25519 public key "
                              f"line: it {err}.", key="--trusted-key",
                              fix="pass the `ed25519:...` line `engineforge keygen` printed"
                              ) from None
    n, problems = release.verify(args.bundle, extract_to=args.extract,
                                 trusted_keys=signing.trusted() | extra)
    if len(problems) == 1:
        print(f"FAILED: {args.bundle}: {problems[0]}", file=sys.stderr)
        return 1
    if problems:
        print(f"FAILED: {args.bundle}", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"OK: {n} engines verified" + (f", extracted to {args.extract}" if args.extract else ""))
    return 0


def cmd_keygen(args) -> int:
    from engineforge import signing

    path = Path(args.out).expanduser() if args.out else signing.default_key_path()
    try:
        public = signing.generate(path, force=args.force)
    except FileExistsError:
        raise ConfigError(f"{path} exists; it is not replaced.", key="--out",
                          fix="pass --force to replace it (entries it signed then need the "
                              "old public key to be trusted), or another --out") from None
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}.", key="--out",
                          fix="pick a writable --out") from None
    print(public)
    print(f"wrote {path} (mode 0600, key id {signing.key_id(public)}); trust it with the line "
          "above in trust.trusted_keys", file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    from engineforge import integrity

    report = integrity.check(args.artifacts)
    if report.problems:
        print(f"FAILED: {len(report.problems)} problem(s) under {args.artifacts} (the next run "
              "rebuilds what they affect)", file=sys.stderr)
        for p in report.problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"OK: {report.outputs} artifacts in {report.sidecars} sidecars verified")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="engineforge",
        description="Run the pipeline, sync tracking, cut and verify releases, check "
                    "artifacts against their sidecars, make a signing key, print the config "
                    "schema.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the Snakemake pipeline (workflow profile, all cores)")
    r.add_argument("snakemake_args", nargs=argparse.REMAINDER,
                   help="passed to snakemake as they are (targets, --dry-run, ...)")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sync", help="upload tracking records left pending by an outage")
    s.add_argument("--artifacts", default="artifacts", help="artifacts directory")
    s.set_defaults(func=cmd_sync)

    rel = sub.add_parser("release", help="bundle engines, register them in MLflow")
    rel.add_argument("version", help="release version, e.g. 1.2.0")
    rel.add_argument("--select", action="append", metavar="PATTERN",
                     help="model/precision/profile/backend with shell wildcards "
                          "(repeatable; default */*/*/*)")
    rel.add_argument("--config", default="config.yaml", help="config file (default config.yaml)")
    rel.add_argument("--directory", help="where the run was started (Snakemake's "
                     "--directory): the config's paths and artifacts resolve there (default: "
                     "the config's directory)")
    rel.add_argument("--artifacts", help="artifacts directory (default: the config's)")
    rel.add_argument("--out", help="output directory (default <artifacts>/releases)")
    rel.add_argument("--alias", help="registry alias (default release-<version>)")
    rel.add_argument("--no-register", action="store_true", help="skip the Model Registry")
    rel.add_argument("--allow-failed", action="store_true",
                     help="include engines whose accuracy audit failed")
    rel.add_argument("--force", action="store_true", help="replace an existing release")
    rel.set_defaults(func=cmd_release)

    v = sub.add_parser("verify", help="check a release bundle's signature, hashes and "
                                      "provenance")
    v.add_argument("bundle", help="engineforge-<version>.tar.gz")
    v.add_argument("--extract", metavar="DIR", help="extract it there when it verifies")
    v.add_argument("--trusted-key", action="append", default=[], metavar="ed25519:...",
                   help="a public key whose signature is accepted (repeatable; this "
                        "builder's own key always is)")
    v.add_argument("--configfile", help="a config whose trust section says which keys are "
                                        "trusted")
    v.set_defaults(func=cmd_verify)

    k = sub.add_parser("keygen", help="make a signing key; prints its public key line")
    k.add_argument("--out", help="private key file (default ~/.config/engineforge/"
                                 "signing.key)")
    k.add_argument("--force", action="store_true", help="replace an existing key file")
    k.set_defaults(func=cmd_keygen)

    c = sub.add_parser("check", help="re-hash every artifact against its sidecar")
    c.add_argument("--artifacts", default="artifacts", help="artifacts directory")
    c.set_defaults(func=cmd_check)

    sc = sub.add_parser("schema", help="print the config's JSON schema (every key, its "
                                       "description and default)")
    sc.add_argument("--json", action="store_true", help="JSON instead of YAML")
    sc.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"] and argv[1:2] not in (["-h"], ["--help"]):
        # argparse cannot pass leading options (`run --dry-run`) through: take them as they are
        args = argparse.Namespace(func=cmd_run, snakemake_args=argv[1:])
    else:
        args = parser().parse_args(argv)
    try:
        code = args.func(args)
    except EngineforgeError as err:
        print(f"engineforge: {err}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `engineforge schema | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
