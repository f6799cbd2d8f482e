"""Composition: a user's own flow that runs two pipelines, one after the other, as subflows."""

from __future__ import annotations

from prefect import flow

from dpipeline_prefect import Pipeline, run_pipeline


@flow(name="two-pipelines")
def two_pipelines(first: str, second: str, run_key: str = "default") -> list[dict]:
    """Run the pipeline file ``first``, then ``second`` (which may read what ``first`` wrote)."""
    a = run_pipeline(Pipeline.from_yaml(first), run_key=run_key)
    b = run_pipeline(Pipeline.from_yaml(second), run_key=run_key)
    return [a, b]
