"""Report — ``artifacts/report.html``: one self-contained page (images as data: URIs, CSS
inline, no external resource) with, per model, the drift heatmap, the error histograms per
output, the localisation results, repaired vs plain variants, latency/speedup per precision ×
profile × backend, and the ONNX/engine sizes.

Two jobs of this one stage. Per model (``{model}`` wildcard): the figures as PNG files and the
model's own page under ``<model>/report/`` (the track job logs them to the model's MLflow
parent run, so they are declared inputs of track); and the model's section, a fragment. Then
the whole page from every model's section. Everything is read from the sidecars through
``Layout`` and the typed results; what does not exist (a localisation, a repaired variant, a
bench) is said to be absent, never an error. matplotlib (Agg canvas, no pyplot) is imported
only when a figure is drawn, one job at a time (jobs are threads of one process).
"""

from __future__ import annotations

import base64
import html
import math
import threading
from pathlib import Path

from engineforge.layout import ALL_PROFILES, Layout
from engineforge.results import AuditResult, BenchResult, BuildResult, Localisation
from engineforge.settings import Section
from engineforge.sidecar import read_json
from engineforge.stages.summary import _fmt, _result  # one formatting, one sidecar reader

ISOLATED = False
TOOLS = ("matplotlib",)
REPAIRED = "-repaired"  # a repaired variant: "<precision>-repaired"
# matplotlib is not thread-safe (its mathtext parser failed with two jobs drawing at once):
# the jobs of one process draw one at a time
_MATPLOTLIB = threading.Lock()


class Settings(Section):
    models: list[str] = []              # the whole page: its models, in order
    precisions: list[str] = []          # one model: its variants (repaired ones included)
    builds: dict[str, list[str]] = {}   # usable backend -> the profiles it builds
    profiles: list[str] = []            # the model's profiles, the first one first


def settings_of(track: Section) -> Settings:
    """One model's report settings from its track settings: the same variants (repaired
    ones included), builds and profiles as the MLflow record it goes into."""
    return Settings(precisions=track.model["precisions"], builds=track.builds,
                    profiles=list(track.model["profiles"]))


def _sidecar_result(path: Path) -> dict | None:
    """A stage output's ``result`` (a sidecar), or the bare result JSON; None if absent."""
    if not path.is_file():
        return None
    data = read_json(path)
    return data.get("result", data) if isinstance(data, dict) else None


# -- the data ----------------------------------------------------------------------------------
def gather(layout: Layout, model: str, s: Settings) -> dict:
    """Everything the model's section shows, from the files that exist."""
    from engineforge.stages import drift

    o = outputs(layout, model, s)
    audits = {k: r for k, p in o["audit"].items() if (r := _result(p, AuditResult))}
    rows = drift.rows_of([o["audit"][k] for k in audits])
    tolerance = {r.precision: r.tolerance for r in audits.values()}
    order = [(r["backend"], r["precision"]) for r in rows]
    hists = []  # (label, {output: ErrorHistogram | None}), in the heatmap's row order
    for (backend, precision), r in audits.items():
        for label, m in ((backend, r), (drift.EMULATED, r.emulated)):
            if m is not None and m.outputs:
                hists.append((order.index((label, precision)), f"{precision} / {label}",
                              {n: d.abs_error_hist for n, d in m.outputs.items()}))
    hists = [h[1:] for h in sorted(hists)]
    baseline = {prof: _result(p, BenchResult) for prof, p in o["baseline"].items()}
    perf = []  # one row per precision × backend × profile
    for (backend, precision, profile), build_path in o["build"].items():
        build = _result(build_path, BuildResult)
        bench = _result(o["bench"][(backend, precision, profile)], BenchResult) if (
            (backend, precision, profile) in o["bench"]) else None
        prec = _sidecar_result(Path(o["precision"][precision]))
        opt = bench.points.get("opt") if bench else None
        base = baseline.get(profile)
        base_opt = base.points.get("opt") if base else None
        perf.append({
            "precision": precision, "backend": backend, "profile": profile,
            "p50_ms": opt and opt.p50_ms, "p99_ms": opt and opt.p99_ms,
            "pytorch_p50_ms": base_opt and base_opt.p50_ms,
            "speedup": base_opt.p50_ms / opt.p50_ms if opt and base_opt else None,
            "bench_note": bench.reason if bench and not opt else None,
            "engine_bytes": build and build.engine_bytes,
            "build_s": build and build.build_time_s,
            "onnx_bytes": prec and prec["bytes"]})
    localise_dir = Path(layout.model(model)) / "audit" / "localise"
    localisations = {p.stem: _localisation_of(p) for p in sorted(localise_dir.glob("*.json"))}
    return {"model": model, "rows": rows, "tolerance": tolerance, "hists": hists,
            "perf": perf, "localisations": localisations,
            "repairs": _repairs(layout, model, s, rows, perf)}


def _localisation_of(path: Path) -> Localisation | str:
    """The variant's Localisation, or why it cannot be read (the report still renders: the
    model's MLflow record waits for it)."""
    try:
        return Localisation.model_validate(_sidecar_result(path))
    except (ValueError, TypeError) as err:
        return f"unreadable {path.name}: {' '.join(str(err).split())[:200]}"


def repaired_variants(layout: Layout, model: str, s: Settings) -> list[str]:
    """The model's repaired variants: those of its variant list, and any found on disk."""
    found = [p.parent.name for p in sorted(
        Path(layout.model(model)).glob(f"precision/*{REPAIRED}/precision.json"))]
    return list(dict.fromkeys([v for v in s.precisions if v.endswith(REPAIRED)] + found))


def outputs(layout: Layout, model: str, s: Settings) -> dict:
    """``Layout.model_outputs``, plus the paths of repaired variants: ``<p>-repaired`` is
    audited, built and benched wherever ``<p>`` is."""
    from engineforge.backends import backend_class

    o = layout.model_outputs(model, s.precisions, s.builds, s.profiles)
    for v in repaired_variants(layout, model, s):
        o["precision"].setdefault(v, layout.precision("precision.json", model, v))
        for b, profiles in s.builds.items():
            if v[:-len(REPAIRED)] not in backend_class(b).precisions:
                continue
            o["audit"].setdefault((b, v), layout.audit(model, b, v))
            for prof in profiles:
                o["build"].setdefault((b, v, prof), layout.build(b, model, v, prof))
                if prof != ALL_PROFILES:
                    o["bench"].setdefault((b, v, prof), layout.bench(model, b, v, prof))
    return o


def _repairs(layout: Layout, model: str, s: Settings, rows: list[dict],
             perf: list[dict]) -> list[dict]:
    """Each repaired variant beside its plain one: the repair record, per backend the
    verdict, drift and latency (first profile) of both, and both ONNX sizes."""
    out = []
    for variant in repaired_variants(layout, model, s):
        prec = _sidecar_result(Path(layout.precision("precision.json", model, variant)))
        if prec is None:
            continue
        repair = (prec.get("extra") or {}).get("repair") or {}
        plain = repair.get("from") or variant[:-len(REPAIRED)]
        plain_prec = _sidecar_result(Path(layout.precision("precision.json", model, plain)))
        first = s.profiles[0] if s.profiles else None
        by_backend = {}
        for which, name in (("plain", plain), ("repaired", variant)):
            for r in rows:
                if r["precision"] == name:
                    by_backend.setdefault(r["backend"], {})[which] = r
            for p in perf:
                if p["precision"] == name and p["profile"] == first:
                    by_backend.setdefault(p["backend"], {})[f"{which}_p50_ms"] = p["p50_ms"]
        out.append({"variant": variant, "plain": plain, "repair": repair,
                    "onnx_bytes": {"plain": plain_prec and plain_prec["bytes"],
                                   "repaired": prec["bytes"]},
                    "backends": by_backend})
    return out


# -- colours: how much of the tolerance a metric uses --------------------------------------------
def _share(used: float, budget: float) -> float:
    if not math.isfinite(used):
        return math.inf
    if budget <= 0:
        return 0.0 if used <= 0 else math.inf
    return max(used, 0.0) / budget


def _snr_share(snr: float, snr_min: float) -> float:
    """The rms error over the rms error the SNR limit allows."""
    return 10 ** ((snr_min - snr) / 20) if math.isfinite(snr) else math.inf


# metric -> (label, format, its tolerance key, share of that limit used: fn(value, limit));
# a tolerance without the key, or a limit set to null, leaves the metric uncoloured
HEATMAP = {
    "cosine": ("cosine", ".6f", "cosine_min", lambda v, lim: _share(1 - v, 1 - lim)),
    "snr_db": ("SNR dB", ".1f", "snr_min_db", _snr_share),
    "max_abs": ("max |err|", ".3g", "max_abs", _share),
    "p99_abs": ("p99 |err|", ".3g", None, None),
    "top1_agreement": ("top-1", ".3f", "top1_min", lambda v, lim: _share(1 - v, 1 - lim)),
    "top5_agreement": ("top-5", ".3f", None, None),
    "accuracy_drop": ("acc. drop", ".4f", "accuracy_drop_max", _share),
}
NEUTRAL, OVER, ABSENT = "#e6e6e6", "#d73027", "#ffffff"
PASS_LOW, PASS_LIMIT = "#91cf60", "#fee08b"  # none of the tolerance used .. all of it


def cell_colour(metric: str, value, tolerance: dict | None) -> str:
    """Green (none of the tolerance used) to yellow (at the limit); red: over it (fail);
    grey: no limit for this metric; white: no value."""
    if value is None:
        return ABSENT
    _, _, key, share_fn = HEATMAP[metric]
    limit = (tolerance or {}).get(key) if key else None
    if limit is None:
        return NEUTRAL
    share = share_fn(value, limit)
    if share > 1:
        return OVER
    from matplotlib.colors import LinearSegmentedColormap, to_hex

    return to_hex(LinearSegmentedColormap.from_list("", [PASS_LOW, PASS_LIMIT])(share))


# -- figures -------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _empty(path: Path, text: str) -> None:
    fig = _figure(6, 1.2)
    fig.text(0.5, 0.5, text, ha="center", va="center")
    fig.savefig(path, format="png")


def heatmap(data: dict, path: Path) -> None:
    rows = data["rows"]
    if not rows:
        return _empty(path, f"{data['model']}: no audit results")
    metrics = [m for m in HEATMAP if any(r.get(m) is not None for r in rows)]
    fig = _figure(1.0 * len(metrics) + 3, 0.4 * len(rows) + 0.6)
    ax = fig.add_subplot()
    ax.set_xlim(0, len(metrics))
    ax.set_ylim(len(rows), 0)
    for i, r in enumerate(rows):
        tol = data["tolerance"].get(r["precision"])
        for j, m in enumerate(metrics):
            v = r.get(m)
            colour = cell_colour(m, v, tol) if r["status"] in ("pass", "fail") else NEUTRAL
            ax.add_patch(_rect(j, i, colour))
            text = "—" if v is None else format(v, HEATMAP[m][1])
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=8,
                    color="white" if colour == OVER else "black",
                    weight="bold" if colour == OVER else "normal")
    ax.set_xticks([j + 0.5 for j in range(len(metrics))], [HEATMAP[m][0] for m in metrics],
                  fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([i + 0.5 for i in range(len(rows))],
                  [f"{r['precision']} / {r['backend']}  [{r['status'].replace('_', ' ')}]"
                   for r in rows], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, format="png")


def _rect(x, y, colour):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="white", linewidth=1.5)


def histograms(data: dict, path: Path) -> None:
    from engineforge.stages.audit import HIST_DECADES

    outputs = sorted({n for _, per_output in data["hists"] for n in per_output})
    if not outputs:
        return _empty(path, f"{data['model']}: no audit outputs")
    fig = _figure(7, 2.8 * len(outputs) + 0.4)
    for k, name in enumerate(outputs):
        ax = fig.add_subplot(len(outputs), 1, k + 1)
        drawn = 0
        for label, per_output in data["hists"]:
            h = per_output.get(name)
            if h is None or not h.counts:
                continue
            total = sum(h.counts) + h.below + h.above + h.non_finite
            note = (f" ({h.below / total:.0%} exact or < 1e{HIST_DECADES[0]})" if h.below
                    else "")
            ax.stairs([c / total for c in h.counts], h.edges, label=label + note)
            drawn += 1
        ax.set_xscale("log")
        ax.set_title(f"output '{name}': |variant - PyTorch fp32|", fontsize=9)
        ax.set_ylabel("share of values", fontsize=8)
        ax.tick_params(labelsize=8)
        if drawn:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        else:
            ax.text(0.5, 0.5, f"no histogram (every error exact or < 1e{HIST_DECADES[0]})",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def latency(data: dict, path: Path) -> None:
    perf = [p for p in data["perf"] if p["p50_ms"] is not None]
    if not perf:
        return _empty(path, f"{data['model']}: no latency measured")
    profiles = list(dict.fromkeys(p["profile"] for p in perf))
    fig = _figure(7, 2.8 * len(profiles) + 0.4)
    for k, profile in enumerate(profiles):
        ax = fig.add_subplot(len(profiles), 1, k + 1)
        points = [p for p in perf if p["profile"] == profile]
        precisions = list(dict.fromkeys(p["precision"] for p in points))
        backends = list(dict.fromkeys(p["backend"] for p in points))
        width = 0.8 / len(backends)
        for b, backend in enumerate(backends):
            xs, ys, labels = [], [], []
            for i, prec in enumerate(precisions):
                for p in points:
                    if p["precision"] == prec and p["backend"] == backend:
                        xs.append(i + (b - (len(backends) - 1) / 2) * width)
                        ys.append(p["p50_ms"])
                        labels.append(f"{p['speedup']:.2f}×" if p["speedup"] else "")
            bars = ax.bar(xs, ys, width, label=backend)
            ax.bar_label(bars, labels, fontsize=7)
        base = next((p["pytorch_p50_ms"] for p in points if p["pytorch_p50_ms"]), None)
        if base:
            ax.axhline(base, color="black", linestyle="--", linewidth=1,
                       label="PyTorch eager (fp32)")
        ax.set_xticks(range(len(precisions)), precisions, fontsize=8)
        ax.set_ylabel("p50 ms (opt shape)", fontsize=8)
        ax.set_title(f"profile '{profile}': latency, speedup vs PyTorch over the bars",
                     fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, format="png")


FIGURES = {"heatmap": heatmap, "histograms": histograms, "latency": latency}


# -- HTML --------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1,h2,h3{font-weight:600} section.model{border-top:2px solid #888;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left} th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums} img{max-width:100%}
.pass{color:#1a7f37} .fail{color:#b00020;font-weight:600} .none{color:#777;font-style:italic}
.note{color:#555;font-size:13px}"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _size(n) -> str:
    if n is None:
        return "—"
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n} B"


def _img(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(head: list[str], rows: list[list], num: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(
            f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>"
            for i, c in enumerate(row)) + "</tr>")
    return "\n".join(out) + "</table>"


def _status(status) -> str:
    cls = {"pass": "pass", "fail": "fail"}.get(status, "")
    return f'<span class="{cls}">{_e(status or "—")}</span>'


def section(data: dict, pngs: dict[str, Path]) -> str:
    m = data["model"]
    parts = [f'<section class="model" id="model-{_e(m)}"><h2>{_e(m)}</h2>',
             "<h3>Drift heatmap</h3>",
             '<p class="note">Rows: precision / backend; reference PyTorch fp32 (worst '
             "output). Colour: share of the precision's tolerance used, green (none) to "
             "yellow (at the limit); red: over the limit (fail); grey: no tolerance for "
             "the metric, or the row was not measured.</p>",
             _img(pngs["heatmap"], f"{m} drift heatmap")]
    reasons = [[_e(f"{r['precision']} / {r['backend']}"), _status(r["status"]),
                _e(r["reason"])] for r in data["rows"] if r.get("reason")]
    if reasons:
        parts.append(_table(["variant", "verdict", "why"], reasons))
    parts += ["<h3>Error histograms per output</h3>",
              _img(pngs["histograms"], f"{m} error histograms"), _hist_table(data["hists"])]
    parts.append(_localisation(data["localisations"]))
    parts.append(_repaired(data["repairs"]))
    parts += ["<h3>Latency and speedup</h3>", _img(pngs["latency"], f"{m} latency")]
    perf = [[_e(p["precision"]), _e(p["backend"]), _e(p["profile"]),
             _e(_fmt(p["p50_ms"], ".3f") if p["p50_ms"] is not None
                else p["bench_note"] or "—"),
             _fmt(p["p99_ms"], ".3f"), _fmt(p["pytorch_p50_ms"], ".3f"),
             _fmt(p["speedup"], ".2f"), _size(p["onnx_bytes"]), _size(p["engine_bytes"]),
             _fmt(p["build_s"], ".2f")]
            for p in data["perf"]]
    parts += ["<h3>Latency, speedup and sizes per precision × profile × backend</h3>",
              '<p class="note">Latency at the profile\'s opt shape; speedup vs eager PyTorch '
              "fp32 on the same shapes and threads.</p>",
              _table(["precision", "backend", "profile", "p50 ms", "p99 ms", "PyTorch p50 ms",
                      "speedup", "ONNX size", "engine size", "build s"], perf,
                     num=set(range(3, 10))) if perf else '<p class="none">none</p>']
    return "\n".join(parts) + "</section>"


def _hist_table(hists: list) -> str:
    """Per output and variant: values compared, the share exact (or below the first bin),
    the bin holding the median error, the highest occupied bin."""
    rows = []
    for label, per_output in hists:
        for name, h in sorted(per_output.items()):
            if h is None:
                rows.append([_e(name), _e(label), "—", "—", "no histogram", "—", "—"])
                continue
            total = sum(h.counts) + h.below + h.above + h.non_finite
            seen = h.below
            median = "exact or below the bins" if seen >= total / 2 else "above the bins"
            for lo, hi, c in zip(h.edges, h.edges[1:], h.counts):
                if seen >= total / 2:
                    break
                seen += c
                if seen >= total / 2:
                    median = f"[{lo:.2g}, {hi:.2g})"
            rows.append([_e(name), _e(label), str(total), f"{h.below / total:.1%}",
                         _e(median), _fmt(h.edges[-1] if h.edges else None, ".2g"),
                         str(h.non_finite)])
    from engineforge.stages.audit import HIST_DECADES

    rows.sort(key=lambda r: r[0])
    return _table(["output", "variant", "values", f"exact or < 1e{HIST_DECADES[0]}",
                   "median |err| in",
                   "largest |err| below", "non-finite"], rows, num={2, 3, 6})


def _localisation(locs: dict[str, Localisation | str]) -> str:
    parts = ["<h3>Localisation</h3>"]
    if not locs:
        return parts[0] + '<p class="none">none (no variant was localised)</p>'
    passing = [v for v, loc in locs.items() if not isinstance(loc, str)
               and loc.status == "passes"]
    if passing:
        parts.append(f'<p class="none">not localised (every audit passed): '
                     f'{_e(", ".join(passing))}</p>')
    for variant, loc in locs.items():
        if isinstance(loc, str):
            parts.append(f"<p><b>{_e(variant)}</b>: {_e(loc)}</p>")
            continue
        if loc.status == "passes":
            continue
        parts.append(f"<p><b>{_e(variant)}</b>: {_e(loc.status)}"
                     + (f" — {_e(loc.reason)}" if loc.reason else "")
                     + f" ({loc.compared} node outputs compared, {loc.samples} samples, "
                     f"{loc.time_s:.2f} s"
                     + (f"; drop = min(SNR in, {loc.ceiling_snr_db:.1f} dB ceiling) − SNR out"
                        if loc.ceiling_snr_db is not None else "") + ")</p>")
        trigger = getattr(loc, "trigger", None)  # what made it run (the failed audits)
        if trigger:
            parts.append(f'<p class="note">triggered by: {_e("; ".join(trigger))}</p>')
        nodes = ([("first", loc.first)] if loc.first else []) + [("worst", n)
                                                                  for n in loc.worst]
        if nodes:
            parts.append(_table(
                ["", "node", "op type", "SNR in dB", "SNR out dB", "drop dB", "cosine"],
                [[which, _e(n.node), _e(n.op_type), _fmt(n.snr_in_db, ".1f"),
                  _fmt(n.snr_out_db, ".1f"), _fmt(n.drop_db, ".1f"), _fmt(n.cosine, ".6f")]
                 for which, n in nodes], num={3, 4, 5, 6}))
    return "\n".join(parts)


def _rounds(rounds: list) -> str:
    """The repair's rounds: nodes kept, verdict, SNR per output, what still failed."""
    rows = []
    for r in rounds:
        r = r if isinstance(r, dict) else {"round": r}
        verdict = r.get("status") or {True: "pass", False: "fail"}.get(r.get("passed"), "—")
        snr = "; ".join(f"{name}: {_fmt(m.get('snr_db'), '.1f')} dB"
                        for name, m in sorted((r.get("metrics") or {}).items())
                        if isinstance(m, dict))
        rows.append([_e(r.get("round", "—")), _e(", ".join(map(str, r.get("excluded") or []))
                                                 or "none"), _status(verdict), _e(snr or "—"),
                     _e("; ".join(map(str, r.get("failures") or [])) or "—")])
    return _table(["round", "kept in higher precision", "verdict", "SNR", "failures"], rows)


def _repaired(repairs: list[dict]) -> str:
    parts = ["<h3>Repaired vs plain variants</h3>"]
    if not repairs:
        return parts[0] + '<p class="none">none (no repaired variant)</p>'
    for rep in repairs:
        r = rep["repair"]
        nodes = r.get("excluded_nodes") or []
        parts.append(
            f"<p><b>{_e(rep['variant'])}</b> (from {_e(rep['plain'])}): repair "
            f"{_e(r.get('status', '—'))}; kept in higher precision: "
            f"{_e(', '.join(map(str, nodes)) or 'none')}; ONNX "
            f"{_size(rep['onnx_bytes']['plain'])} → {_size(rep['onnx_bytes']['repaired'])}"
            "</p>")
        if r.get("rounds"):
            parts.append(_rounds(r["rounds"]))
        rows = []
        for backend, d in rep["backends"].items():
            plain, fixed = d.get("plain") or {}, d.get("repaired") or {}
            cost = (d["repaired_p50_ms"] / d["plain_p50_ms"] - 1
                    if d.get("repaired_p50_ms") and d.get("plain_p50_ms") else None)
            rows.append([_e(backend), _status(plain.get("status")), _status(fixed.get("status")),
                         f"{_fmt(plain.get('cosine'), '.6f')} → "
                         f"{_fmt(fixed.get('cosine'), '.6f')}",
                         f"{_fmt(plain.get('max_abs'))} → {_fmt(fixed.get('max_abs'))}",
                         f"{_fmt(d.get('plain_p50_ms'), '.3f')} → "
                         f"{_fmt(d.get('repaired_p50_ms'), '.3f')}",
                         "—" if cost is None else f"{cost:+.1%}"])
        if rows:
            parts.append(_table(["backend", "plain", "repaired", "cosine", "max |err|",
                                 "p50 ms (first profile)", "latency cost"], rows))
    return "\n".join(parts)


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n"
            f"<h1>{_e(title)}</h1>\n{body}\n</body></html>\n")


# -- the stage ---------------------------------------------------------------------------------
# model figure/page -> output role of the report_model rule
OUTPUTS = {"heatmap": "drift_heatmap.png", "histograms": "error_histograms.png",
           "latency": "latency.png", "html": "report.html", "section": "section.html"}


def write_model(layout: Layout, model: str, s: Settings, out: dict[str, Path]) -> None:
    """The model's figures, page and section (``out``: role -> path, as ``OUTPUTS``)."""
    data = gather(layout, model, s)
    out["html"].parent.mkdir(parents=True, exist_ok=True)
    with _MATPLOTLIB:
        for name, draw in FIGURES.items():
            draw(data, out[name])
    text = section(data, {name: out[name] for name in FIGURES})
    out["section"].write_text(text)
    out["html"].write_text(page(f"engineforge report — {model}", text))


def write_whole(layout: Layout, models: list[str], out: Path,
                failures: list[dict] | None = None) -> None:
    """The whole page from the models' sections; after a run with failed jobs, those jobs
    first (a model whose section is missing says so)."""
    toc = "<ul>" + "".join(f'<li><a href="#model-{_e(m)}">{_e(m)}</a></li>'
                           for m in models) + "</ul>"
    parts = [toc]
    if failures:
        parts.append("<h2>Failed jobs</h2>" + _table(
            ["model", "stage", "variant", "reason"],
            [[_e(f.get("model") or "—"), _e(f.get("stage") or f.get("job")),
              _e("/".join(str(f[k]) for k in ("precision", "profile", "backend")
                          if f.get(k)) or "—"), _e(f.get("reason"))] for f in failures]))
    for m in models:
        path = Path(layout.report("section.html", m))
        parts.append(path.read_text() if path.is_file() else
                     f'<section class="model" id="model-{_e(m)}"><h2>{_e(m)}</h2>'
                     '<p class="none">no report (its jobs failed)</p></section>')
    out.write_text(page("engineforge report", "\n".join(parts)))


def run(job) -> None:
    layout = job.inputs_layout
    if job.model is None:
        write_whole(layout, job.settings.models, job.outputs["html"])
    else:
        write_model(layout, job.model, job.settings, job.outputs)
