"""`sdebatch report RUNS_DIR`: the invariance report of one sweep folder, in one command.

Writes into ``<out>`` (default ``<RUNS_DIR>/report``): the figures as PNG and PDF (Okabe-Ito and viridis colours,
safe for the common colour-vision deficiencies), ``report.json`` (the numbers) and ``report.html``, one page that
needs nothing else: the figures are embedded as data URIs, the style is inline, there is no script and no link out,
so it opens offline and can be mailed. Sections, each where the sweep has what it needs:

1. final loss vs batch per update per rule, paired by seed against the logical run (mean +- se over seeds, the
   held-out estimator's own se in brackets), each rule against the square-root rule run for run, and the knee: the
   first batch whose paired deviation is worse (a higher loss) by more than 2 se and the tolerance;
2. B_simple from the end-of-run probe (or the in-run estimator) next to the knee;
3. loss vs tokens (or samples) per batch: do the curves collapse?
4. loss vs lr per batch and rule (sweeps over several lrs): the fitted optimum and how far it moves;
5. every run: its config, final loss, tokens/s, wall clock, diverged.
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..sweep import collect
from ..utils import atomic_write
from . import batch_ablation as ba
from . import lr_transfer as lt

RUN_COLUMNS = ("run_id", "rule", "logical_batch_size", "physical_batch_size", "lr", "seed", "tokens_seen",
               "samples_seen", "updates", "final_loss", "final_loss_se", "tokens_per_s", "wall_clock_s", "diverged")
_STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:
1100px;padding:0 1em;color:#111}h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #ccc;padding:.2em .5em;
text-align:right}th{background:#f2f2f2}td.l,th.l{text-align:left}img{max-width:100%;height:auto;display:block;
margin:.5em 0}p.note{color:#444;font-size:.9em}.bad{color:#b00}.wide{overflow-x:auto}
code{background:#f4f4f4;padding:0 .2em}"""


def _label(rule: str) -> str:
    """The label of a rule (:func:`sdebatch.figures.batch_ablation.label`, the figures' own) as HTML text."""
    return html.escape(ba.label(rule, plain=True))


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool) or v in ("True", "False"):
        return str(v)
    x = _num(v)
    if x is None:
        return str(v)
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def _pct(m: float | None, se: float | None = None, est: float | None = None) -> str:
    if m is None or not math.isfinite(m):
        return "diverged" if m is not None else ""
    s = f"{100 * m:+.2f}%"
    if se:
        s += f" &plusmn; {100 * se:.2f}"
    if est is not None:
        s += f" [{100 * est:.2f}]"
    return s


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<div class="wide"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _batch_section(rows: list[dict], folder: Path, out: Path, name: str, tolerance: float) -> tuple[str, dict, list]:
    s = ba.summarise(rows, tolerance, folder=folder)
    est, cest = s.get("paired_estimator_se", {}), s.get("contrast_estimator_se", {})
    table_rows = []
    for (rule, b), mean in sorted(s["means"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
        p = s["paired"].get((rule, b))
        c = s["contrast"].get((rule, b))
        table_rows.append([_label(rule), _fmt(b), _fmt(s["seeds"][(rule, b)]), _fmt(mean),
                           _pct(s["deviation"][(rule, b)], s["deviation_se"].get((rule, b))),
                           _pct(p[0], p[1], est.get((rule, b))) if p else "",
                           _pct(c[0], c[1], cest.get((rule, b))) if c else ""])
    figs = ba.paired_vs_batch(s, out, name) + ba.loss_vs_batch(s, out, name, "held-out loss")
    lb = s["logical_batch_size"]
    knees = ", ".join(f"{_label(r)}: <b>{k if k else 'none'}</b>"
                      for r, k in sorted(s["knee"].items()) if r != "accumulate")
    spread = (f"the logical run's seed-to-seed spread is {100 * s['reference_spread']:.1f}% "
              f"({s['reference_runs']} seeds)" if s["reference_spread"] is not None else
              "one seed: no seed spread, no standard errors")
    est_line = (f"; one run's held-out estimator se is {100 * s['estimator_se']:.2f}% (median over runs)"
                if s.get("estimator_se") is not None else "")
    parts = [
        "<h2>1. Final loss vs batch per update</h2>",
        f'<p class="note">Logical batch {lb}; loss of the logical run {_fmt(s["reference"])}. Deviations are relative '
        f"to the logical run; <i>paired</i> compares each run with the logical run of its own seed (mean &plusmn; se "
        f"over seeds, [the held-out estimator's own se]); the last column is each rule minus the "
        f"{_label(ba.CONTRAST_BASE)}, run for run. A difference is called real beyond 2 se. {spread}{est_line}.</p>",
        _table(["rule", "physical batch", "runs", "final loss", "vs logical (means)", "paired vs logical",
                f"minus {ba.label(ba.CONTRAST_BASE, plain=True)} (paired)"], table_rows),
        f"<p>Knee (first batch whose paired deviation is worse, a higher loss, by more than 2 se and {tolerance:.0%}):"
        f" {knees}.</p>",
    ]
    parts += [_img(p, p.stem) for p in figs if p.suffix == ".png"]
    noise = s["noise_scales"]  # the logical runs' estimates behind the median
    knee = s["knee"].get("sqrt_exact")
    parts.append("<h2>2. Noise scale and knee</h2>")
    if s["noise_scale"]:
        rng = f", range {min(noise):.0f}&ndash;{max(noise):.0f} over {len(noise)} runs" if len(noise) > 1 else ""
        relation = ("" if not knee else f"; the knee of the {_label('sqrt_exact')} is at {knee} "
                    f"({knee / s['noise_scale']:.2g} x B_simple)")
        parts.append(f"<p>B_simple of the logical runs (median): <b>{s['noise_scale']:.0f}</b> samples{rng}"
                     f"{relation}. The SDE rules are expected to hold up to a batch of the order of B_simple.</p>")
    else:
        parts.append("<p>No noise-scale estimate in these runs (no probe, no in-run estimator).</p>")
    return "\n".join(parts), s, figs


def report(folder: str | Path, out: str | Path | None = None, *, tolerance: float = 0.01) -> dict:
    """Write the report of a sweep folder; returns {"html": path, "figures": [...], "summary": {...}}.

    Args:
        folder: a sweep folder of ``sdebatch sweep run`` (run folders with config.json and metrics.json).
        out: where to write (default ``<folder>/report``; created).
        tolerance: the knee's relative deviation (default 0.01), together with 2 paired standard errors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"RUNS_DIR {folder} is not a folder (a sweep's output, e.g. runs/demo)")
    if not 0 < tolerance < 1:
        raise ValueError(f"--tolerance must be in (0, 1), got {tolerance}")
    rows = collect(folder)
    if not rows:
        raise ValueError(f"no finished runs in {folder} (run folders with metrics.json): run "
                         f"`sdebatch sweep run <sweep.toml> --out {folder.parent}` first")
    out = Path(out) if out is not None else folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    name = folder.name
    sections, figures, numbers = [], [], {"runs": len(rows)}
    has_batches = all("rule" in r and "physical_batch_size" in r and "logical_batch_size" in r for r in rows)
    if has_batches:
        text, s, figs = _batch_section(rows, folder, out, name, tolerance)
        sections.append(text)
        figures += figs
        numbers["batch"] = {"knee": s["knee"], "noise_scale": s["noise_scale"], "reference": s["reference"],
                            "reference_spread": s["reference_spread"], "estimator_se": s.get("estimator_se"),
                            "paired": {f"{r}@{b}": v for (r, b), v in s["paired"].items()},
                            "contrast": {f"{r}@{b}": v for (r, b), v in s["contrast"].items()}}
        x = "tokens" if any("tokens_seen" in r for r in rows) else "samples"
        figs = ba.loss_vs_tokens(folder, out, name, x)
        figures += figs
        sections.append(f"<h2>3. Loss vs {x} per batch</h2>" + (
            '<p class="note">Training loss averaged over each twentieth of the run and over seeds; under a rule that '
            "holds, the curves of every physical batch fall on the logical run's (dotted).</p>"
            + "".join(_img(p, p.stem) for p in figs if p.suffix == ".png") if figs else
            "<p>No loss curves with this clock in the runs.</p>"))
        lrs = {(r["rule"], int(r["physical_batch_size"]), _num(r.get("lr"))) for r in rows}
        if any(len({lr for rr, b, lr in lrs if (rr, b) == cell}) >= 3 for cell in {(r, b) for r, b, _ in lrs}):
            t = lt.summarise(rows)
            figs = lt.figure(t, out, name)
            figures += figs
            lr_rows = []
            for (rule, b), v in sorted(t["cells"].items(), key=lambda kv: (kv[0][0], kv[0][1])):
                f, sh = v["fit"], v.get("shift")
                lr_rows.append([_label(rule), _fmt(b), _fmt(len(v["lrs"])),
                                f"{f['lr']:.3g}" + (" (grid edge)" if f["at_edge"] else ""),
                                f"{f['log2_lr']:.2f}" + (f" &plusmn; {f['se']:.2f}" if f["se"] else ""),
                                (f"{sh['octaves']:+.2f}" + (f" &plusmn; {sh['se']:.2f}" if sh["se"] else "")
                                 + f" (no rescaling: {sh['expected_naive']:+.2f})") if sh else "reference"])
            numbers["lr_transfer"] = {f"{r}@{b}": {"lr": v["fit"]["lr"], "log2_se": v["fit"]["se"],
                                                   "shift": v.get("shift")} for (r, b), v in t["cells"].items()}
            sections.append("<h2>4. Loss vs lr per batch</h2>" + _table(
                ["rule", "physical batch", "lrs", "optimum lr", "log2 optimum", "shift (octaves) vs logical"],
                lr_rows) + "".join(_img(p, p.stem) for p in figs if p.suffix == ".png"))
    else:
        sections.append("<p>The runs do not say their rule and batch sizes: only the run table follows.</p>")
    cols = [c for c in RUN_COLUMNS if any(c in r for r in rows)]
    run_rows = []
    for r in sorted(rows, key=lambda r: str(r.get("run_id"))):
        cells = [_label(str(r[c])) if c == "rule" and c in r else html.escape(_fmt(r.get(c))) for c in cols]
        if r.get("diverged") in (True, "True"):
            cells = [f'<span class="bad">{c}</span>' for c in cells]
        run_rows.append(cells)
    sections.append(f"<h2>5. Every run ({len(rows)})</h2>" + _table(cols, run_rows))
    total = sum(_num(r.get("wall_clock_s")) or 0.0 for r in rows)
    tps = [x for x in (_num(r.get("tokens_per_s")) for r in rows) if x is not None]
    head = (f"<h1>Batch-size report: {html.escape(name)}</h1><p class=\"note\">{len(rows)} runs from "
            f"<code>{html.escape(str(folder))}</code>, {total / 3600:.2f} h of run time"
            + (f", median {statistics.median(tps):,.0f} tokens/s" if tps else "")
            + f"; written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by "
            f"<code>sdebatch report {html.escape(str(folder))}</code>.</p>")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>sdebatch report: "
            f"{html.escape(name)}</title><style>{_STYLE}</style></head><body>{head}"
            + "\n".join(sections) + "</body></html>")
    atomic_write(out / "report.html", page.encode())
    atomic_write(out / "report.json", json.dumps(numbers, indent=1, default=str).encode())
    return {"html": out / "report.html", "json": out / "report.json", "figures": figures, "summary": numbers}
