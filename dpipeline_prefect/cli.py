"""The ``dpipeline`` command line: run, backfill, validate, checkpoints ls / gc, dlq ls / show / replay, audit,
alerts install / ls / remove, report, loglevel.

Errors end the command with one clear line on stderr and a non-zero exit; the full
traceback is printed only with ``--verbose``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Sharded, checkpointed, exactly-once pipelines on Prefect and Dask.")
ckpt_app = typer.Typer(no_args_is_help=True, help="Inspect and clean up checkpoints.")
app.add_typer(ckpt_app, name="checkpoints")
dlq_app = typer.Typer(no_args_is_help=True, help="Inspect and replay the dead-letter queue.")
app.add_typer(dlq_app, name="dlq")
alerts_app = typer.Typer(no_args_is_help=True, help="Prefect automations that notify a webhook.")
app.add_typer(alerts_app, name="alerts")
# Piped output (logs, CI, tests) is not wrapped at 80 columns: a long path stays one line.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _fail(e: BaseException, verbose: bool) -> None:
    if verbose:
        err.print_exception()
    from .pipeline import translate_prefect_error

    e = translate_prefect_error(e)  # a 401 from the Prefect API: say which setting to fix
    msg = str(e).strip() or type(e).__name__
    err.print(f"[bold red]error:[/] {msg}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(1)


def _quiet_prefect_console(verbose: bool) -> None:
    """Prefect echoes flow/task logs (and engine tracebacks) to the console; keep that for --verbose.

    The logs still reach the Prefect server (its API handler is untouched). Prefect reads
    ``PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL`` when it configures logging, so this must run
    before Prefect is imported.
    """
    if verbose:
        return
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    for name in ("distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _Progress:
    """A rich progress bar fed by the flow's progress hooks (shards and rows done, rows/s)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rows]:,} rows  {task.fields[rate]:,.0f} rows/s"),
            TimeElapsedColumn(), console=err, transient=False,
        )
        self.task = None
        self.rows = 0
        self.rows_now = 0
        self.t0 = time.perf_counter()

    def __call__(self, event: str, p: dict) -> None:
        if event == "stage":
            self.stage_rows, self.stage_t0 = 0, time.perf_counter()
            self.progress.start()
            self.stage = self.progress.add_task("shuffle", total=p["splits"], rows=0, rate=0.0)
        elif event == "split_done":
            self.stage_rows += p.get("rows", 0)
            rate = self.stage_rows / max(1e-9, time.perf_counter() - self.stage_t0)
            self.progress.update(self.stage, advance=1, rows=self.stage_rows, rate=rate)
        elif event == "start":
            self.t0 = time.perf_counter()
            self.progress.start()
            self.rows = p["rows_done"]
            self.task = self.progress.add_task("shards", total=p["shards_total"], completed=p["shards_done"],
                                               rows=self.rows, rate=0.0)
        elif event == "batch" and self.task is not None:
            self.rows += p.get("rows", 0)
            self.rows_now += p.get("rows", 0)
            rate = self.rows_now / max(1e-9, time.perf_counter() - self.t0)
            self.progress.update(self.task, rows=self.rows, rate=rate)
        elif event == "shard_done" and self.task is not None:
            self.progress.update(self.task, advance=1)

    def stop(self) -> None:
        self.progress.stop()


def _summary_table(s: dict) -> Table:
    t = Table(title=f"{s['pipeline']} / {s['run_key']}: {s['status']}", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    keys = ("rows_in", "rows_out", "rows_dead_letter", "shards_total", "shards_skipped", "batches_reprocessed",
            "retries", "bytes_read", "bytes_written", "duration_s", "rows_per_s", "lock_waited_s",
            "limit_wait_s", "breaker_openings", "transforms_skipped", "sink",
            "flow_run_id")
    if s.get("mode") == "stream":  # stream.py: one increment
        keys = ("seq", "resumed", "files_new", "rows_in", "windows_emitted", "windows_reemitted", "windows_open",
                "rows_late", "late_rule", "rows_dead_letter", "rows_late_dropped", "late_expired",
                "rows_no_event_time", "watermark", "max_event_time", "state_bytes", "bytes_written",
                "duration_s", "lock_waited_s", "sink", "flow_run_id")
    for k in keys:
        v = s.get(k)
        if v is None or (k in ("lock_waited_s", "limit_wait_s") and v < 0.5):
            continue
        if k in ("breaker_openings", "transforms_skipped") and not v:
            continue  # shown only when the run degraded
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    return t


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    run_key: str = typer.Option("default", "--run-key", help="Identifies the run; re-use it to resume."),
    restart: bool = typer.Option(False, "--restart", help="Discard this run key's checkpoints and output first."),
    summary_json: Optional[Path] = typer.Option(None, "--summary-json", help="Write the run summary here."),
    wait: Optional[float] = typer.Option(
        None, "--wait", min=0,
        help="If another run of this pipeline and run key holds the lock, wait up to this many seconds "
             "(default: lock.wait_s from the file)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs and full tracebacks."),
) -> None:
    """Run (or resume) a pipeline."""
    _quiet_prefect_console(verbose)
    try:
        from .pipeline import Pipeline

        p = Pipeline.from_yaml(pipeline)
        if wait is not None:
            p.config.lock.wait_s = wait
        from . import progress

        bar = _Progress()
        progress.hooks.append(bar)
        try:
            summary = p.run(run_key=run_key, restart=restart)
        finally:
            progress.hooks.remove(bar)
            bar.stop()
    except Exception as e:  # noqa: BLE001 - every failure ends in one line
        _fail(e, verbose)
        return
    if summary.get("status") == "already_complete":
        out.print(f"run key {run_key!r} of {p.name} is already complete: nothing to do "
                  "(use --restart to run it again)")
    out.print(_summary_table(summary))
    if summary_json:
        summary_json.write_text(json.dumps({k: v for k, v in summary.items()}, indent=2, default=str))


@app.command()
def backfill(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    start: str = typer.Option(..., "--from", help="First run key's date (YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC)."),
    end: str = typer.Option(..., "--to", help="Last run key's date, inclusive."),
    every: str = typer.Option("1D", "--every", help="Step between run keys: 1D, 6H, 30M, 1W..."),
    deployment: Optional[str] = typer.Option(
        None, "--deployment",
        help="FLOW/DEPLOYMENT to create the runs through (run_deployment); default: run here."),
    run_key_format: Optional[str] = typer.Option(
        None, "--run-key-format",
        help="strftime format of the run keys (default: the deployment's run_key_format, else "
             "YYYY-MM-DD for whole days, YYYY-MM-DDTHH:MM finer)."),
    summary_json: Optional[Path] = typer.Option(None, "--summary-json", help="Write the per-key results here."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs and full tracebacks."),
) -> None:
    """Run every run key in a date range once, skipping keys already complete."""
    _quiet_prefect_console(verbose)
    from .backfill import backfill as do_backfill

    def show(item) -> None:
        err.print(f"{item.run_key}: {item.status}" + (f" ({item.error})" if item.error else ""),
                  highlight=False, markup=False)

    try:
        from .audit import audited
        from .config import load_config
        from .pipeline import prefect_api

        name = load_config(pipeline).name
        with prefect_api(), audited("backfill", name, None, {"from": start, "to": end, "every": every,
                                                             "deployment": deployment,
                                                             "run_key_format": run_key_format}) as rec:
            items = do_backfill(pipeline, start, end, every, deployment=deployment,
                                run_key_format=run_key_format, on_item=show)
            rec.details.update(run_keys=len(items), ran=sum(i.action == "ran" for i in items),
                               failed=[i.run_key for i in items if i.failed])
    except Exception as e:  # noqa: BLE001 - every failure ends in one line
        _fail(e, verbose)
        return
    failed = [i for i in items if i.failed]
    t = Table(title=f"backfill of {pipeline}: {len(items)} run key(s), "
                    f"{sum(i.action == 'skipped' for i in items)} skipped, {len(failed)} failed")
    for c in ("run_key", "action", "status", "rows_out", "duration_s", "flow_run", "error"):
        t.add_column(c)
    for i in items:
        t.add_row(i.run_key, i.action, i.status, "" if i.rows_out is None else f"{i.rows_out:,}",
                  "" if i.duration_s is None else f"{i.duration_s:.1f}", i.flow_run or "", i.error or "")
    out.print(t)
    if summary_json:
        summary_json.write_text(json.dumps([i.to_dict() for i in items], indent=2, default=str))
    if failed:
        raise typer.Exit(1)


@app.command()
def validate(pipeline: Path = typer.Argument(..., help="Pipeline YAML file.")) -> None:
    """Check the file, import the transforms, and reach each storage."""
    from .config import load_config
    from .errors import DPipelineError

    problems: list[str] = []
    try:
        cfg = load_config(pipeline)
    except DPipelineError as e:
        _fail(e, False)
        return
    from .pipeline import _make_importable
    from .sources import plan_source
    from .storage import Storage
    from .transforms import load_function

    _make_importable(str(pipeline.resolve().parent))
    checks: list[tuple[str, str]] = []

    def check(what: str, fn) -> None:
        try:
            detail = fn()
            checks.append((what, f"ok{': ' + detail if detail else ''}"))
        except Exception as e:  # noqa: BLE001
            checks.append((what, f"FAILED: {e}"))
            problems.append(f"{what}: {e}")

    for t in cfg.transforms:
        check(f"transform {t}", lambda t=t: (load_function(t), "")[1])
    if cfg.sharding.strategy == "custom":
        check(f"sharding.function {cfg.sharding.function}", lambda: (load_function(cfg.sharding.function, "sharding function"), "")[1])

    def src():
        if cfg.stream is not None:  # an empty or missing folder only means nothing arrived yet
            from .incremental import find_new_files
            from .stream import StreamState, state_store

            doc = state_store(cfg).load_shard("state")
            consumed = StreamState.from_doc(doc).consumed if doc else {}
            found = find_new_files(cfg.source, consumed, cfg.stream.max_file_age)
            return f"stream: {len(found.files)} new file(s), {len(consumed)} consumed"
        plan = plan_source(cfg.source)
        return f"{len(plan.files)} file(s), {plan.bytes_total:,} bytes, {len(plan.schema)} columns"

    check(f"source {cfg.source.path}", src)
    check(f"sink {cfg.sink.path}", lambda: (Storage(cfg.sink.resolved_path("validate"), cfg.sink.storage_options).probe(), "writable")[1])
    check(f"checkpoint {cfg.checkpoint.path}", lambda: (Storage(cfg.checkpoint.path, cfg.checkpoint.storage_options).probe(), "writable")[1])
    t = Table(title=f"{pipeline}: {cfg.name}")
    t.add_column("check")
    t.add_column("result")
    for what, res in checks:
        t.add_row(what, res)
    out.print(t)
    if problems:
        for p in problems:
            err.print(f"[bold red]error:[/] {p}", highlight=False)
        raise typer.Exit(1)


@ckpt_app.command("ls")
def checkpoints_ls(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    run_key: Optional[str] = typer.Option(None, "--run-key"),
) -> None:
    """List the runs that have checkpoints, with their progress."""
    try:
        from .checkpoint import list_runs
        from .config import load_config
        from .storage import Storage

        cfg = load_config(pipeline)
        from .crypto import cipher_for

        runs = list_runs(Storage(cfg.checkpoint.path, cfg.checkpoint.storage_options), cfg.name,
                         cipher=cipher_for(cfg.encryption))
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    t = Table(title=f"checkpoints of {cfg.name}")
    for c in ("run_key", "status", "shards", "done", "updated"):
        t.add_column(c)
    for r in runs:
        if run_key and r.run_key != run_key:
            continue
        d = r if isinstance(r, dict) else r.__dict__
        t.add_row(str(d.get("run_key")), str(d.get("status")), str(d.get("shards")),
                  str(d.get("shards_done")), _fmt_time(d.get("updated")))
    out.print(t)


def _fmt_time(v) -> str:
    import datetime as dt

    if isinstance(v, dt.datetime):
        return v.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
    return str(v or "")


@ckpt_app.command("gc")
def checkpoints_gc(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    keep: int = typer.Option(..., "--keep", min=0, help="Completed runs to keep (newest first)."),
) -> None:
    """Delete old checkpoint generations and all but the newest N completed runs."""
    try:
        from .checkpoint import gc
        from .config import load_config
        from .storage import Storage

        from dataclasses import asdict

        from .audit import audited
        from .pipeline import prefect_api

        cfg = load_config(pipeline)
        from .crypto import cipher_for

        with prefect_api(), audited("checkpoints-gc", cfg.name, None,
                                    {"keep": keep, "checkpoint": cfg.checkpoint.path}) as rec:
            report = gc(Storage(cfg.checkpoint.path, cfg.checkpoint.storage_options), cfg.name, keep,
                        cipher=cipher_for(cfg.encryption))
            rec.details.update(asdict(report))
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    out.print(report)


def _dlq_config(pipeline: Path, run_key: str | None = None):
    """Load the pipeline and check it has a dead_letter section; its folder becomes importable.

    ``run_key`` is checked first: it becomes a path segment and a lock name.
    """
    from .config import load_config, validate_run_key

    if run_key is not None:
        validate_run_key(run_key)
    from .errors import ConfigError
    from .pipeline import _make_importable

    cfg = load_config(pipeline)
    if cfg.dead_letter is None:
        raise ConfigError(f"{pipeline}: no dead_letter section, so this pipeline has no dead-letter queue",
                          field="dead_letter")
    _make_importable(str(pipeline.resolve().parent))
    return cfg


@dlq_app.command("ls")
def dlq_ls(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    run_key: str = typer.Option("default", "--run-key"),
) -> None:
    """List the queued files: shard, batch, rows and error types; totals per shard."""
    try:
        from .dead_letter import dead_letter_url, summarize

        cfg = _dlq_config(pipeline, run_key)
        rows = summarize(cfg, run_key)
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    t = Table(title=f"dead letters of {cfg.name} / {run_key}: {sum(r['rows'] for r in rows):,} row(s)")
    for c in ("file", "shard", "batch", "round", "rows", "stage", "errors"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["file"], r["shard"], str(r["batch"]), str(r["round"]), f"{r['rows']:,}",
                  ",".join(r["stages"]), ", ".join(f"{k} x{v}" for k, v in sorted(r["errors"].items())))
    out.print(t)
    per_shard: dict[str, int] = {}
    for r in rows:
        per_shard[r["shard"]] = per_shard.get(r["shard"], 0) + r["rows"]
    if per_shard:
        out.print("rows per shard: " + ", ".join(f"{k} {v:,}" for k, v in sorted(per_shard.items())))
    out.print(f"folder: {dead_letter_url(cfg, run_key)[0]}")


@dlq_app.command("show")
def dlq_show(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    run_key: str = typer.Option("default", "--run-key"),
    limit: int = typer.Option(20, "--limit", min=1, help="Rows to show."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Only this shard id."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row."),
) -> None:
    """Show queued rows with their errors (the _dlq_* columns first)."""
    try:
        from .dead_letter import read_queue

        cfg = _dlq_config(pipeline, run_key)
        df = read_queue(cfg, run_key, limit=limit, shard=shard)
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    if as_json:
        sys.stdout.write(df.to_json(orient="records", lines=True, date_format="iso", default_handler=str))
        return
    if not len(df):
        out.print("the dead-letter queue is empty")
        return
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 10_000, "display.max_colwidth", 80):
        out.print(df.to_string(index=False), highlight=False, markup=False, soft_wrap=True)


@dlq_app.command("replay")
def dlq_replay(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    run_key: str = typer.Option("default", "--run-key"),
    summary_json: Optional[Path] = typer.Option(None, "--summary-json", help="Write the replay report here."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the queued rows through the current transforms into the sink, exactly once."""
    try:
        from .audit import audited
        from .dead_letter import replay
        from .pipeline import prefect_api

        cfg = _dlq_config(pipeline, run_key)
        with prefect_api(), audited("dlq-replay", cfg.name, run_key, {"sink": cfg.sink.path}) as rec:
            if cfg.lock.enabled:
                # A replay writes to the run's sink and dead-letter store: it takes the same
                # lock as a run of this pipeline and run key, so neither races the other.
                from .locks import RunLock

                with RunLock(cfg.name, run_key, wait_s=cfg.lock.wait_s,
                             lease_s=cfg.lock.lease_s, poll_s=cfg.lock.poll_s):
                    rep = replay(cfg, run_key)
            else:
                rep = replay(cfg, run_key)
            rec.details.update({k: v for k, v in rep.to_dict().items() if k != "errors"})
    except Exception as e:  # noqa: BLE001
        _fail(e, verbose)
        return
    d = rep.to_dict()
    t = Table(title=f"replay of {cfg.name} / {run_key}", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    for k in ("files", "files_replayed", "files_pending", "rows_replayed", "rows_out", "rows_still_dead",
              "calls", "duration_s"):
        v = d[k]
        t.add_row(k, f"{v:,}" if isinstance(v, int) else f"{v:.3f}")
    if d["errors"]:
        t.add_row("errors", ", ".join(f"{k} x{v}" for k, v in sorted(d["errors"].items())))
    out.print(t)
    if summary_json:
        summary_json.write_text(json.dumps(d, indent=2, default=str))


@app.command("loglevel")
def loglevel_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    level: str = typer.Argument(..., help="DEBUG, INFO, WARNING, ERROR, CRITICAL, or reset."),
) -> None:
    """Change the log level of this pipeline's runs while they run (read within logging.poll_s)."""
    try:
        from .audit import audited
        from .config import load_config
        from .loglevel import parse_level, set_level, variable_name
        from .pipeline import prefect_api

        cfg = load_config(pipeline)
        new = None if level.strip().lower() == "reset" else parse_level(level)
        with prefect_api(), audited("loglevel", cfg.name, None, {"level": (new or "reset").upper()}):
            set_level(cfg.name, new)
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    out.print(f"{variable_name(cfg.name)} = {(new or 'reset').upper()}: running processes of {cfg.name} "
              f"apply it within {cfg.logging.poll_s:g} s")


@app.command("audit")
def audit_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    since: str = typer.Option("7d", "--since", help="How far back: 7d, 12h, 30m, 2w or an ISO time."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per action."),
) -> None:
    """List who did what to this pipeline: restarts, checkpoint gc, replays, alert installs, backfills."""
    try:
        from .audit import parse_since, read_audit
        from .config import load_config
        from .pipeline import prefect_api

        cfg = load_config(pipeline)
        t0 = parse_since(since)
        with prefect_api():
            entries = read_audit(cfg.name, t0)
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    if as_json:
        for e in entries:
            sys.stdout.write(json.dumps(e, default=str) + "\n")
        return
    t = Table(title=f"audit trail of {cfg.name} since {t0.strftime('%Y-%m-%d %H:%M')} UTC: {len(entries)} action(s)")
    for c in ("when (UTC)", "action", "outcome", "run key", "who", "prefect", "details"):
        t.add_column(c)
    for e in entries:
        w = e.get("who") or {}
        d = e.get("details") or {}
        t.add_row(str(e["at"])[:19].replace("T", " "), e["action"], str(e["outcome"]), str(e.get("run_key") or "-"),
                  f"{w.get('user')}@{w.get('host')} (uid {w.get('uid')}, pid {w.get('pid')})",
                  f"{w.get('prefect_api')} client {w.get('prefect_client_version')} server "
                  f"{w.get('prefect_server_version')}" + (f" flow run {w['flow_run_id']}" if w.get("flow_run_id") else ""),
                  ", ".join(f"{k}={v}" for k, v in d.items()))
    out.print(t)


@app.command()
def health(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    as_json: bool = typer.Option(False, "--json", help="The checks as one JSON list."),
) -> None:
    """Check that the pipeline can run now: Prefect API, Dask, storage, limits. Exit 1 if not."""
    _quiet_prefect_console(False)
    try:
        from .config import load_config
        from .health import check_health

        cfg = load_config(pipeline)
        checks = check_health(cfg)
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    from rich.markup import escape

    bad = [c for c in checks if not c.ok]
    if as_json:
        sys.stdout.write(json.dumps([c.__dict__ for c in checks], default=str) + "\n")
    else:
        t = Table(title=f"health of {cfg.name}: {'healthy' if not bad else 'UNHEALTHY'}")
        for c in ("check", "status", "detail", "s"):
            t.add_column(c)
        for c in checks:
            t.add_row(escape(c.item), "[green]ok[/]" if c.ok else "[bold red]FAILED[/]",
                      escape(c.detail), f"{c.seconds:.2f}")
        out.print(t)
    if bad:
        err.print(f"[bold red]unhealthy:[/] {escape(', '.join(c.item for c in bad))}", highlight=False)
        raise typer.Exit(1)


def _server_api_url() -> str:
    """The configured Prefect server: alerts live in its automations services, so an
    embedded throw-away server would be useless here."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        from .errors import ConfigError

        raise ConfigError("alerts need a running Prefect server (its triggers and actions "
                          "services send them): set PREFECT_API_URL", field="PREFECT_API_URL")
    return url


@alerts_app.command("install")
def alerts_install(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    webhook: str = typer.Option(..., "--webhook", envvar="DPIPELINE_ALERT_WEBHOOK", show_envvar=True,
                                help="URL notifications are POSTed to (kept as a block secret, never printed)."),
    no_data_within: Optional[str] = typer.Option(
        None, "--no-data-within",
        help="Also alert when no run completes within this interval (e.g. 1d, 12h, 30m)."),
    crashed_after: str = typer.Option(
        "10m", "--crashed-after",
        help="Mark a run Crashed (and alert) when it stopped heartbeating this long ago without "
             "ending; must exceed PREFECT_FLOWS_HEARTBEAT_FREQUENCY (180 s by default). 'off': none."),
) -> None:
    """Create or update the pipeline's alert automations (re-running updates, never duplicates)."""
    try:
        from .alerts import install
        from .config import load_config

        cfg = load_config(pipeline)
        url = _server_api_url()
        res = install(cfg.name, webhook, no_data_within,
                      None if crashed_after.strip().lower() == "off" else crashed_after)  # audited inside
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    t = Table(title=f"alerts of {cfg.name} on {url}")
    t.add_column("automation")
    t.add_column("done")
    for name, what in res.automations.items():
        t.add_row(name, what)
    out.print(t)
    out.print(f"notifications go through block {res.block} (webhook URL stored as a secret)")


@alerts_app.command("ls")
def alerts_ls(pipeline: Path = typer.Argument(..., help="Pipeline YAML file.")) -> None:
    """List the pipeline's alert automations and their triggers."""
    try:
        from .alerts import list_alerts
        from .config import load_config

        cfg = load_config(pipeline)
        _server_api_url()
        rows = list_alerts(cfg.name)
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    t = Table(title=f"alerts of {cfg.name}: {len(rows)}")
    for c in ("automation", "enabled", "trigger"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], "yes" if r["enabled"] else "no", r["trigger"])
    out.print(t)


@alerts_app.command("remove")
def alerts_remove(pipeline: Path = typer.Argument(..., help="Pipeline YAML file.")) -> None:
    """Delete the pipeline's alert automations and its webhook block."""
    try:
        from .alerts import remove
        from .config import load_config

        from .audit import audited

        cfg = load_config(pipeline)
        _server_api_url()
        with audited("alerts-remove", cfg.name, None) as rec:
            gone = remove(cfg.name)
            rec.details["removed"] = list(gone)
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    out.print(f"removed {len(gone)}: " + (", ".join(gone) if gone else "nothing was installed"))


@app.command("report")
def report_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    run_key: str = typer.Option(..., "--run-key", help="The run key to report on."),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="HTML file to write (default: report-<pipeline>-<run key>.html)."),
) -> None:
    """Write an HTML report of a run key from its recorded metrics: throughput over time,
    batch latency histogram, rows per shard."""
    try:
        from .config import load_config, validate_run_key
        from .report import build_report

        cfg = load_config(pipeline)
        validate_run_key(run_key)
        page = build_report(cfg, run_key)
        target = output or Path(f"report-{cfg.name}-{run_key.replace(':', '_')}.html")
        target.write_text(page, encoding="utf-8")
    except Exception as e:  # noqa: BLE001
        _fail(e, False)
        return
    out.print(f"report of {cfg.name} / {run_key} written to {target}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
