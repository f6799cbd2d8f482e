"""Alerts: Prefect automations that notify a webhook when a pipeline needs a person.

``dpipeline alerts install PIPELINE.yaml --webhook URL [--no-data-within 1d]`` (or
:func:`install` from Python, see ``deployments/alerts.py``) creates, per pipeline:

* one **notification block**, a Prefect ``CustomWebhookNotificationBlock`` named
  ``dpipeline-alerts-<pipeline>``. The URL is kept only in the block's ``secrets`` (a
  ``SecretDict``: the API returns it obfuscated) and the block's ``url`` field is the
  placeholder ``{{webhook_url}}``, so the URL is never in an automation, an event, a log line
  or this module's output;
* up to four **automations** (``prefect.automations.Automation``) with a ``SendNotification``
  action on that block, named ``dpipeline/<pipeline>/<kind>``:

  ========================  ==========================================================
  ``run-failed``            a flow run of the pipeline became Failed or Crashed (Prefect's
                            own ``prefect.flow-run.Failed|Crashed`` events, matched through
                            the run's tag ``dpipeline:<pipeline>``, which ``flows.py`` sets)
  ``breaker-opened``        ``dpipeline.breaker.opened`` on ``dpipeline.pipeline.<name>``
                            (at most one notification per ``BREAKER_QUIET`` window)
  ``dead-letter-threshold`` ``dpipeline.rows.dead_letter_threshold`` (a run's dead rows
                            reached ``monitoring.dead_letter_alert_rows``)
  ``no-completed-run``      proactive: no ``dpipeline.run.completed`` within the interval
                            (only with ``--no-data-within``)
  ``crash-detection``       not a notification: a run that stopped heartbeating without
                            ending (SIGKILL, a lost machine) for ``--crashed-after`` (10 min)
                            is set Crashed, so ``run-failed`` reports it
  ========================  ==========================================================

Each install is audited (``dpipeline.audit.alerts-install`` events, see ``audit.py``).
Re-running ``install`` finds the block and the automations by name and updates them, so
nothing is duplicated; an automation no longer wanted (``no-completed-run`` without
``--no-data-within``) is deleted. ``remove`` deletes them all and the block. The triggers and
actions run in the Prefect server's ``triggers`` and ``actions`` services: this process only
writes definitions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import ConfigError, DPipelineError

__all__ = [
    "KINDS",
    "AlertInstall",
    "automation_name",
    "block_name",
    "pipeline_tag",
    "parse_interval",
    "build_automations",
    "install",
    "list_alerts",
    "remove",
]

KINDS = ("run-failed", "breaker-opened", "dead-letter-threshold", "no-completed-run", "crash-detection")
#: A run killed with SIGKILL (or whose machine died) sends no state change: it stays Running.
#: Prefect's recipe for that: a flow run that heartbeated and then neither heartbeated again
#: nor ended within this long is marked Crashed, which the run-failed alert then reports.
#: Flow runs heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (180 by default).
DEFAULT_CRASHED_AFTER = timedelta(minutes=10)
_TERMINAL = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
             "prefect.flow-run.Crashed"}
BREAKER_QUIET = timedelta(minutes=5)  # one breaker notification per pipeline per window
MIN_INTERVAL = timedelta(seconds=10)  # Prefect's minimum for proactive triggers
_SECRET_KEY = "webhook_url"


def pipeline_tag(pipeline: str) -> str:
    """The tag every flow run of ``pipeline`` carries (set in ``pipeline.py``; kept off its task runs)."""
    return f"dpipeline:{pipeline}"


def automation_name(pipeline: str, kind: str) -> str:
    """The stable name of one alert's automation; ``install`` finds it by this name."""
    return f"dpipeline/{pipeline}/{kind}"


def block_name(pipeline: str) -> str:
    """The notification block's name (block names allow only lowercase letters, digits and -)."""
    slug = pipeline.replace("_", "-")
    if slug != pipeline:  # "a_b" and "a-b" are different pipelines: keep their blocks apart
        slug += "-" + hashlib.sha1(pipeline.encode()).hexdigest()[:6]
    return f"dpipeline-alerts-{slug}"


_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_interval(text: str, option: str = "--no-data-within") -> timedelta:
    """``"90s"``, ``"30m"``, ``"12h"``, ``"1d"``, ``"2w"`` (or plain seconds) as a timedelta."""
    field = option.lstrip("-").replace("-", "_")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*", text or "")
    if not m:
        raise ConfigError(f"{option} {text!r}: expected a number with s, m, h, d or w "
                          "(e.g. 1d, 12h, 30m)", field=field)
    td = timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2) or "s"])
    if td < MIN_INTERVAL:
        raise ConfigError(f"{option} {text!r}: Prefect's proactive triggers need at "
                          f"least {int(MIN_INTERVAL.total_seconds())} s", field=field)
    return td


def _pipeline_resource(pipeline: str) -> str:
    return f"dpipeline.pipeline.{pipeline}"


def build_automations(pipeline: str, block_document_id: Any,
                      no_data_within: timedelta | None = None,
                      crashed_after: timedelta | None = DEFAULT_CRASHED_AFTER) -> list:
    """The automations of ``pipeline`` (not yet saved), notifying through the given block.

    ``crashed_after`` (None: none) adds ``crash-detection``, which marks a run Crashed when it
    stopped heartbeating without ending (it must exceed the heartbeat frequency).
    """
    from prefect.automations import (Automation, ChangeFlowRunState, EventTrigger, Posture,
                                     SendNotification)
    from prefect.client.schemas.objects import StateType

    res = _pipeline_resource(pipeline)

    def notify(subject: str, body: str) -> list:
        return [SendNotification(block_document_id=block_document_id, subject=subject, body=body)]

    autos = [
        Automation(
            name=automation_name(pipeline, "run-failed"),
            description=f"A flow run of pipeline {pipeline} failed or crashed.",
            tags=["dpipeline", pipeline_tag(pipeline)],
            trigger=EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.id": f"prefect.tag.{pipeline_tag(pipeline)}"},
                posture=Posture.Reactive, threshold=1, within=timedelta(0),
            ),
            actions=notify(
                f"dpipeline {pipeline}: run {{{{ flow_run.name }}}} {{{{ flow_run.state.name }}}}",
                f"Pipeline {pipeline}: flow run {{{{ flow_run.name }}}} ({{{{ flow_run.id }}}}) "
                "entered state {{ flow_run.state.name }}: {{ flow_run.state.message }}",
            ),
        ),
        Automation(
            name=automation_name(pipeline, "breaker-opened"),
            description=f"A circuit breaker of pipeline {pipeline} opened (at most one "
                        f"notification per {int(BREAKER_QUIET.total_seconds() // 60)} min).",
            tags=["dpipeline", pipeline_tag(pipeline)],
            trigger=EventTrigger(
                expect={"dpipeline.breaker.opened"},
                match={"prefect.resource.id": res},
                posture=Posture.Reactive, threshold=1, within=BREAKER_QUIET,
            ),
            actions=notify(
                f"dpipeline {pipeline}: circuit breaker opened",
                f"Pipeline {pipeline}: breaker {{{{ event.resource['dpipeline.breaker'] }}}} opened "
                "in run key {{ event.resource['dpipeline.run_key'] }} at {{ event.occurred }}: "
                "{{ event.payload.reason }}",
            ),
        ),
        Automation(
            name=automation_name(pipeline, "dead-letter-threshold"),
            description=f"A run of pipeline {pipeline} dead-lettered more rows than "
                        "monitoring.dead_letter_alert_rows.",
            tags=["dpipeline", pipeline_tag(pipeline)],
            trigger=EventTrigger(
                expect={"dpipeline.rows.dead_letter_threshold"},
                match={"prefect.resource.id": res},
                posture=Posture.Reactive, threshold=1, within=timedelta(0),
            ),
            actions=notify(
                f"dpipeline {pipeline}: dead-lettered rows past the threshold",
                f"Pipeline {pipeline}: {{{{ event.payload.rows }}}} row(s) dead-lettered "
                "(threshold {{ event.payload.threshold }}) in run key "
                "{{ event.resource['dpipeline.run_key'] }}; queue: {{ event.payload.where }}",
            ),
        ),
    ]
    if crashed_after is not None:
        autos.append(Automation(
            name=automation_name(pipeline, "crash-detection"),
            description=f"A flow run of pipeline {pipeline} that stopped heartbeating for "
                        f"{crashed_after} without ending is marked Crashed.",
            tags=["dpipeline", pipeline_tag(pipeline)],
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", *_TERMINAL},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.id": f"prefect.tag.{pipeline_tag(pipeline)}"},
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive, threshold=1, within=crashed_after,
            ),
            actions=[ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {crashed_after}: the process running the flow is gone "
                        "(killed, or its machine stopped)")],
        ))
    if no_data_within is not None:
        autos.append(Automation(
            name=automation_name(pipeline, "no-completed-run"),
            description=f"No run of pipeline {pipeline} completed within {no_data_within}.",
            tags=["dpipeline", pipeline_tag(pipeline)],
            trigger=EventTrigger(
                expect={"dpipeline.run.completed"},
                match={"prefect.resource.id": res},
                posture=Posture.Proactive, threshold=1, within=no_data_within,
            ),
            actions=notify(
                f"dpipeline {pipeline}: no completed run within {no_data_within}",
                f"Pipeline {pipeline}: no run completed within {no_data_within}.",
            ),
        ))
    return autos


@dataclass
class AlertInstall:
    """What :func:`install` did: the block's name and, per automation, created/updated/deleted."""

    pipeline: str
    block: str
    automations: dict[str, str]


def _save_block(pipeline: str, webhook_url: str) -> Any:
    """Create or overwrite the pipeline's webhook block; return its block document id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name=block_name(pipeline),
        url="{{" + _SECRET_KEY + "}}",
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "pipeline": pipeline},
        secrets={_SECRET_KEY: webhook_url},
        allow_private_urls=True,
    )
    return block.save(block_name(pipeline), overwrite=True)


def _check_url(url: str) -> None:
    if not re.match(r"^https?://[^/\s]+", url or ""):
        # The message must not repeat the URL: it may hold a token.
        raise ConfigError("--webhook: expected an http:// or https:// URL", field="webhook")


def install(pipeline: str, webhook_url: str, no_data_within: timedelta | str | None = None,
            crashed_after: timedelta | str | None = DEFAULT_CRASHED_AFTER) -> AlertInstall:
    """Create or update the alerts of ``pipeline`` on the current Prefect API (idempotent).

    Args:
        pipeline: the pipeline's name (``name:`` in its YAML).
        webhook_url: where notifications are POSTed (JSON ``{"subject", "body", "pipeline"}``).
            Stored only as a block secret.
        no_data_within: add the proactive "no completed run within" alert (``"1d"`` or a
            timedelta); ``None`` removes it if an earlier install made it.
        crashed_after: mark a run Crashed (and so alert) when it stopped heartbeating this
            long ago without ending; ``None`` leaves crash detection out.
    """
    from .audit import audited

    _check_url(webhook_url)
    if isinstance(no_data_within, str):
        no_data_within = parse_interval(no_data_within)
    if isinstance(crashed_after, str):
        crashed_after = parse_interval(crashed_after, "--crashed-after")
    # audited (audit.py): the events name the pipeline and what changed, never the URL
    with audited("alerts-install", pipeline, None,
                 {"no_data_within": str(no_data_within) if no_data_within else None,
                  "crashed_after": str(crashed_after) if crashed_after else None}) as a:
        res = _install(pipeline, webhook_url, no_data_within, crashed_after)
        a.details["automations"] = res.automations
    return res


def _install(pipeline: str, webhook_url: str, no_data_within: timedelta | None,
             crashed_after: timedelta | None) -> AlertInstall:
    from prefect import get_client

    try:
        block_id = _save_block(pipeline, webhook_url)
        wanted = build_automations(pipeline, block_id, no_data_within, crashed_after)
        done: dict[str, str] = {}
        with get_client(sync_client=True) as client:
            for auto in wanted:
                found = client.read_automations_by_name(auto.name)
                if found:
                    auto.id = found[0].id
                    auto.update()
                    for extra in found[1:]:  # duplicates made by hand or by a race
                        client.delete_automation(extra.id)
                    done[auto.name] = "updated"
                else:
                    auto.create()
                    done[auto.name] = "created"
            names = {a.name for a in wanted}
            for kind in KINDS:
                name = automation_name(pipeline, kind)
                if name in names:
                    continue
                for stale in client.read_automations_by_name(name):
                    client.delete_automation(stale.id)
                    done[name] = "deleted"
    except DPipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - one clear line; nothing in it comes from the URL
        raise DPipelineError(f"alerts install for {pipeline}: Prefect API call failed "
                             f"({type(e).__name__}: {_scrub(str(e), webhook_url)})") from None
    return AlertInstall(pipeline, block_name(pipeline), done)


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def list_alerts(pipeline: str) -> list[dict[str, Any]]:
    """The pipeline's installed automations: name, enabled, trigger (one line), actions."""
    from prefect import get_client

    out = []
    with get_client(sync_client=True) as client:
        for kind in KINDS:
            for a in client.read_automations_by_name(automation_name(pipeline, kind)):
                out.append({"name": a.name, "kind": kind, "enabled": a.enabled, "id": str(a.id),
                            "trigger": a.trigger.describe_for_cli().replace("\n", " ").strip(),
                            "description": a.description})
    return out


def remove(pipeline: str) -> list[str]:
    """Delete the pipeline's automations and its webhook block; return what was deleted."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    gone = []
    with get_client(sync_client=True) as client:
        for kind in KINDS:
            for a in client.read_automations_by_name(automation_name(pipeline, kind)):
                client.delete_automation(a.id)
                gone.append(a.name)
        try:
            doc = client.read_block_document_by_name(block_name(pipeline), "custom-webhook")
            client.delete_block_document(doc.id)
            gone.append(f"block {block_name(pipeline)}")
        except ObjectNotFound:
            pass
    return gone
