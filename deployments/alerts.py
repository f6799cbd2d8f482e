"""The pipeline's alerts as Python code: the same automations as ``dpipeline alerts install``.

    PREFECT_API_URL=http://prefect:4200/api DPIPELINE_ALERT_WEBHOOK=https://hooks.example/... \\
        python deployments/alerts.py examples/flights/pipeline.yaml --no-data-within 1d

Re-running it updates the automations in place (they are found by name). The webhook URL is
read from ``DPIPELINE_ALERT_WEBHOOK`` so it stays out of shell history and process lists; it
is stored only as a secret of the ``dpipeline-alerts-<pipeline>`` notification block.
To see or change what is created, read ``dpipeline_prefect/alerts.py``:
``build_automations(pipeline, block_id, no_data_within)`` returns the ``Automation`` objects.
"""

from __future__ import annotations

import argparse
import os
import sys

from dpipeline_prefect.alerts import install, parse_interval
from dpipeline_prefect.config import load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline", help="pipeline YAML file")
    ap.add_argument("--no-data-within", default=None, help="e.g. 1d, 12h: alert when no run completes")
    ap.add_argument("--crashed-after", default="10m",
                    help="mark a run Crashed when its heartbeats stopped this long ago ('off': no)")
    args = ap.parse_args(argv)
    url = os.environ.get("DPIPELINE_ALERT_WEBHOOK")
    if not url:
        print("set DPIPELINE_ALERT_WEBHOOK to the webhook URL", file=sys.stderr)
        return 2
    cfg = load_config(args.pipeline)
    interval = parse_interval(args.no_data_within) if args.no_data_within else None
    crashed = None if args.crashed_after == "off" else parse_interval(args.crashed_after, "--crashed-after")
    res = install(cfg.name, url, interval, crashed)
    for name, what in res.automations.items():
        print(f"{name}: {what}")
    print(f"block: {res.block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
