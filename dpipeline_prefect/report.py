"""``dpipeline report``: one self-contained HTML page about a run key, from its saved metrics.

Reads every metrics record of the run key (``metrics.load_runs``: one per flow run, a resumed
run adds one) and draws, as inline SVG generated here (no plotting library, no external file,
no script):

* throughput over time - input rows per second, summed over all shards, in time bins;
* the batch latency histogram - merged over all shards and flow runs, with p50 / p95 / p99;
* rows per shard - rows in, out and dead-lettered.

with the totals and a table per shard. Nothing in it comes from storage options: URLs are
shown without credentials.
"""

from __future__ import annotations

import datetime
import html
import math
from typing import Any

from .errors import DPipelineError
from .events import safe_url
from .metrics import BOUNDS, LatencyHistogram, load_runs, metrics_storage

__all__ = ["build_report", "render_html", "throughput_series"]

_W, _H, _PAD = 760, 260, 56
_COLORS = {"in": "#3b6ea8", "out": "#5aa469", "dead": "#d0593c", "line": "#3b6ea8", "bar": "#7a5ea8"}


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: float) -> str:
    if v >= 1e9:
        return f"{v / 1e9:.1f}G"
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    if v >= 10 or v == 0:
        return f"{v:.0f}"
    return f"{v:.2g}"


def _fmt_s(v: float) -> str:
    if v < 1e-3:
        return f"{v * 1e6:.0f}µs"
    if v < 1:
        return f"{v * 1e3:.0f}ms"
    return f"{v:.1f}s"


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * e >= v:
            return m * e
    return 10 * e


def _axes(title: str, xlabel: str, ylabel: str, ymax: float) -> list[str]:
    x0, y0, x1, y1 = _PAD, _H - 36, _W - 16, 28
    out = [f'<text x="{_W / 2}" y="16" text-anchor="middle" font-weight="bold">{_esc(title)}</text>',
           f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#333"/>',
           f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#333"/>',
           f'<text x="{(x0 + x1) / 2}" y="{_H - 4}" text-anchor="middle">{_esc(xlabel)}</text>',
           f'<text x="12" y="{(y0 + y1) / 2}" text-anchor="middle" transform="rotate(-90 12 {(y0 + y1) / 2})">{_esc(ylabel)}</text>']
    for i in range(5):
        v = ymax * i / 4
        y = y0 - (y0 - y1) * i / 4
        out.append(f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    return out


def _svg(kind: str, parts: list[str]) -> str:
    return (f'<svg class="plot" data-plot="{kind}" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
            f'viewBox="0 0 {_W} {_H}" font-family="sans-serif" font-size="11">' + "".join(parts) + "</svg>")


def throughput_series(runs: list[dict[str, Any]], bins: int = 60) -> tuple[float, float, list[float]]:
    """Input rows per second over time: (start, bin width s, rows/s per bin), all shards summed.

    Each batch's rows are spread over its latency interval (its read-transform-write time), so
    a bin shows what was being processed then, not only when batches happened to finish.
    """
    spans = []
    for run in runs:
        fi = {f: i for i, f in enumerate(run.get("fields", []))}
        for s in run["shards"]:
            for r in s.get("records", []):
                end, lat = float(r[fi["t"]]), max(1e-6, float(r[fi["latency_s"]]))
                spans.append((end - lat, end, float(r[fi["rows_in"]])))
    if not spans:
        return 0.0, 1.0, []
    t0, t1 = min(a for a, _, _ in spans), max(b for _, b, _ in spans)
    width = max((t1 - t0) / bins, 1e-3)
    n = max(1, math.ceil((t1 - t0) / width))
    acc = [0.0] * n
    for a, b, rows in spans:
        rate = rows / (b - a)
        i = int((a - t0) / width)
        while i < n and t0 + i * width < b:
            lo, hi = max(a, t0 + i * width), min(b, t0 + (i + 1) * width)
            if hi > lo:
                acc[i] += rate * (hi - lo)
            i += 1
    return t0, width, [v / width for v in acc]


def _throughput_svg(runs: list[dict[str, Any]]) -> str:
    t0, width, series = throughput_series(runs)
    ymax = _nice_max(max(series, default=0.0))
    parts = _axes("Throughput over time", "seconds since the first batch started", "rows/s", ymax)
    x0, y0, x1, y1 = _PAD, _H - 36, _W - 16, 28
    if series:
        span = width * len(series)
        pts = []
        for i, v in enumerate(series):
            xa = x0 + (x1 - x0) * (i * width) / span
            xb = x0 + (x1 - x0) * ((i + 1) * width) / span
            y = y0 - (y0 - y1) * v / ymax
            pts += [f"{xa:.1f},{y:.1f}", f"{xb:.1f},{y:.1f}"]
        parts.append(f'<polyline fill="none" stroke="{_COLORS["line"]}" stroke-width="2" points="{" ".join(pts)}"/>')
        for i in range(5):
            x = x0 + (x1 - x0) * i / 4
            parts.append(f'<text x="{x:.1f}" y="{y0 + 14}" text-anchor="middle">{span * i / 4:.1f}</text>')
    else:
        parts.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no batches recorded</text>')
    return _svg("throughput", parts)


def _latency_svg(hist: LatencyHistogram) -> str:
    used = [i for i, c in enumerate(hist.counts) if c]
    parts: list[str] = []
    if not used:
        return _svg("latency", _axes("Batch latency", "seconds per batch", "batches", 1.0)
                    + [f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no batches recorded</text>'])
    lo, hi = max(0, used[0] - 1), min(len(hist.counts) - 1, used[-1] + 1)
    counts = hist.counts[lo:hi + 1]
    ymax = _nice_max(max(counts))
    parts = _axes("Batch latency histogram", "seconds per batch (bucket upper bound)", "batches", ymax)
    x0, y0, x1, y1 = _PAD, _H - 36, _W - 16, 28
    bw = (x1 - x0) / len(counts)
    for j, c in enumerate(counts):
        h = (y0 - y1) * c / ymax
        x = x0 + j * bw
        i = lo + j
        label = _fmt_s(BOUNDS[i]) if i < len(BOUNDS) else "more"
        parts.append(f'<rect x="{x + 1:.1f}" y="{y0 - h:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
                     f'fill="{_COLORS["bar"]}"><title>&lt;= {label}: {c} batch(es)</title></rect>')
        if j % max(1, len(counts) // 8) == 0:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{y0 + 14}" text-anchor="middle">{label}</text>')
    for q, dash in ((0.5, "4,2"), (0.95, "2,2"), (0.99, "1,2")):
        v = hist.quantile(q)
        i = min(range(len(BOUNDS)), key=lambda k: abs(BOUNDS[k] - v)) if v else lo
        x = x0 + (min(max(i, lo), hi) - lo + 0.5) * bw
        parts.append(f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y0}" stroke="#000" stroke-dasharray="{dash}"/>')
        parts.append(f'<text x="{x + 3:.1f}" y="{y1 + 10 + 12 * [0.5, 0.95, 0.99].index(q)}">p{int(q * 100)} {_fmt_s(v)}</text>')
    return _svg("latency", parts)


def _shards_svg(shards: list[dict[str, Any]]) -> str:
    ymax = _nice_max(max((s["rows_in"] for s in shards), default=0))
    parts = _axes("Rows per shard", "shard", "rows", ymax)
    x0, y0, x1, y1 = _PAD, _H - 36, _W - 16, 28
    if not shards:
        return _svg("shards", parts)
    gw = (x1 - x0) / len(shards)
    bw = max(gw / 3 - 1, 1)
    for j, s in enumerate(shards):
        for k, (key, color) in enumerate((("rows_in", "in"), ("rows_out", "out"), ("rows_dead", "dead"))):
            h = (y0 - y1) * s[key] / ymax
            x = x0 + j * gw + k * bw + 0.5
            parts.append(f'<rect x="{x:.1f}" y="{y0 - h:.1f}" width="{bw:.1f}" height="{h:.1f}" fill="{_COLORS[color]}">'
                         f'<title>{_esc(s["label"])} {key}: {s[key]:,}</title></rect>')
        if len(shards) <= 24 or j % max(1, len(shards) // 24) == 0:
            parts.append(f'<text x="{x0 + (j + 0.5) * gw:.1f}" y="{y0 + 14}" text-anchor="middle">{_esc(s["label"][:14])}</text>')
    for k, (name, color) in enumerate((("rows in", "in"), ("rows out", "out"), ("dead-lettered", "dead"))):
        parts.append(f'<rect x="{x1 - 300 + k * 100}" y="22" width="10" height="10" fill="{_COLORS[color]}"/>'
                     f'<text x="{x1 - 286 + k * 100}" y="31">{name}</text>')
    return _svg("shards", parts)


def _merge_shards(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per shard over all flow runs of the run key (the work each one did)."""
    by: dict[str, dict[str, Any]] = {}
    for run in runs:
        for s in run["shards"]:
            e = by.setdefault(s["shard"], {"shard": s["shard"], "label": s["label"], "rows_in": 0, "rows_out": 0,
                                           "rows_dead": 0, "batches": 0, "retries": 0, "duration_s": 0.0,
                                           "status": s["status"], "hist": LatencyHistogram()})
            for k in ("rows_in", "rows_out", "rows_dead", "batches", "retries"):
                e[k] += int(s.get(k) or 0)
            e["duration_s"] += float(s.get("duration_s") or 0.0)
            if s["status"] != "skipped":
                e["status"] = s["status"]
            e["hist"].merge(LatencyHistogram.from_dict(s.get("hist")))
    return [by[k] for k in sorted(by)]


def _ts(t: float | None) -> str:
    if not t:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_html(pipeline: str, run_key: str, runs: list[dict[str, Any]], where: str) -> str:
    """The report page for the saved records ``runs`` of ``pipeline`` / ``run_key``."""
    hist = LatencyHistogram()
    for run in runs:
        hist.merge(LatencyHistogram.from_dict(run.get("hist")))
    shards = _merge_shards(runs)
    rows_in = sum(s["rows_in"] for s in shards)
    busy = sum((r.get("ended") or r["started"]) - r["started"] for r in runs)
    totals = [
        ("flow runs", len(runs)), ("status of the last", runs[-1]["status"]), ("shards", len(shards)),
        ("rows in", f"{rows_in:,}"), ("rows out", f"{sum(s['rows_out'] for s in shards):,}"),
        ("rows dead-lettered", f"{sum(s['rows_dead'] for s in shards):,}"),
        ("batches", f"{hist.count:,}"), ("retries", sum(s["retries"] for s in shards)),
        ("rows/s (over the flow runs' time)", f"{rows_in / busy:,.1f}" if busy else "-"),
        ("batch latency p50 / p95 / p99", " / ".join(_fmt_s(hist.quantile(q)) for q in (0.5, 0.95, 0.99))),
    ]
    runs_rows = "".join(
        f"<tr><td>{_esc(r.get('flow_run_id') or '')}</td><td>{_ts(r['started'])}</td><td>{_ts(r.get('ended'))}</td>"
        f"<td>{_esc(r['status'])}</td><td>{r['totals']['rows_in']:,}</td><td>{r['totals']['batches']:,}</td></tr>"
        for r in runs)
    shard_rows = "".join(
        f"<tr><td>{_esc(s['label'])}</td><td>{_esc(s['status'])}</td><td>{s['rows_in']:,}</td><td>{s['rows_out']:,}</td>"
        f"<td>{s['rows_dead']:,}</td><td>{s['batches']:,}</td>"
        f"<td>{(s['rows_in'] / s['duration_s']) if s['duration_s'] else 0:,.1f}</td>"
        f"<td>{_fmt_s(s['hist'].quantile(0.95))}</td><td>{s['retries']}</td></tr>"
        for s in shards)
    workers = {}
    for r in runs:
        workers.update(r.get("workers") or {})
    worker_rows = "".join(f"<tr><td>{_esc(w)}</td><td>{v.get('rss', 0) / 2**20:,.0f} MiB</td>"
                          f"<td>{v.get('cpu', 0):.0f}%</td></tr>" for w, v in sorted(workers.items()))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>dpipeline report: {_esc(pipeline)} / {_esc(run_key)}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; max-width: 820px; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
svg.plot {{ display: block; margin: 8px 0 24px; border: 1px solid #eee; }}
.muted {{ color: #777; font-size: 90%; }}
</style></head><body>
<h1>{_esc(pipeline)} / {_esc(run_key)}</h1>
<p class="muted">Generated {_ts(datetime.datetime.now(datetime.timezone.utc).timestamp())} from {len(runs)} metrics
record(s) in <code>{_esc(safe_url(where))}</code>.</p>
<table>{"".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in totals)}</table>
{_throughput_svg(runs)}
{_latency_svg(hist)}
{_shards_svg(shards)}
<h2>Shards</h2>
<table><tr><th>shard</th><th>status</th><th>rows in</th><th>rows out</th><th>dead</th><th>batches</th>
<th>rows/s</th><th>p95 batch</th><th>retries</th></tr>{shard_rows}</table>
<h2>Flow runs</h2>
<table><tr><th>flow run</th><th>started</th><th>ended</th><th>status</th><th>rows in</th><th>batches</th></tr>{runs_rows}</table>
<h2>Workers (last sample)</h2>
<table><tr><th>worker</th><th>RSS</th><th>CPU</th></tr>{worker_rows}</table>
</body></html>
"""


def build_report(cfg: Any, run_key: str) -> str:
    """The HTML report of ``run_key`` of pipeline ``cfg``.

    Raises:
        DPipelineError: the run key has no saved metrics (never run, metrics off, or removed).
    """
    st = metrics_storage(cfg, run_key)
    runs = load_runs(cfg, run_key)
    if not runs:
        raise DPipelineError(
            f"no metrics for run key {run_key!r} of {cfg.name} in {safe_url(st.unstrip(st.root))}: "
            "run it first (with monitoring.metrics on, the default)", path=safe_url(st.url))
    return render_html(cfg.name, run_key, runs, st.unstrip(st.root) if not st.is_local else st.root)
