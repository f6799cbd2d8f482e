"""Register the dpipeline block types and create named blocks on the Prefect server.

    python blocks/create_blocks.py register
    DPIPELINE_S3_KEY=... DPIPELINE_S3_SECRET=... \
        python blocks/create_blocks.py storage my-s3 --endpoint http://127.0.0.1:8333 \
            [--base-url s3://raw/] [--region us-east-1] [--option anon=false] [--overwrite]
    python blocks/create_blocks.py pipeline flights-clean --file examples/flights/pipeline.yaml

Secrets are read from the environment only (``--key-env`` / ``--secret-env`` name the
variables; defaults DPIPELINE_S3_KEY and DPIPELINE_S3_SECRET), never from arguments: command
lines are visible to every user of the machine (``ps``). Nothing secret is printed. The
server is the one PREFECT_API_URL (or the active Prefect profile) points at.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected KEY=VALUE")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)  # numbers and booleans keep their type


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and register types / create one block; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("register", help="register the block types (dpipeline-storage, dpipeline-pipeline)")

    st = sub.add_parser("storage", help="create or update a dpipeline-storage block")
    st.add_argument("name")
    st.add_argument("--base-url", help="fsspec URL relative paths are joined to, e.g. s3://raw/")
    st.add_argument("--endpoint", help="S3-compatible endpoint URL")
    st.add_argument("--region")
    st.add_argument("--key-env", default="DPIPELINE_S3_KEY", help="variable holding the access key id")
    st.add_argument("--secret-env", default="DPIPELINE_S3_SECRET", help="variable holding the secret key")
    st.add_argument("--option", action="append", type=_parse_option, default=[],
                    help="more fsspec storage_options as KEY=VALUE (not secret); repeatable")
    st.add_argument("--overwrite", action="store_true", help="replace a block of that name")

    pl = sub.add_parser("pipeline", help="create or update a dpipeline-pipeline block from a YAML file")
    pl.add_argument("name")
    pl.add_argument("--file", required=True, help="the pipeline YAML file")
    pl.add_argument("--overwrite", action="store_true", help="replace a block of that name")

    args = parser.parse_args(argv)

    from dpipeline_prefect.blocks import PipelineBlock, StorageBlock, check_block_name
    from dpipeline_prefect.errors import DPipelineError

    try:
        if args.command == "register":
            for cls in (StorageBlock, PipelineBlock):
                cls.register_type_and_schema()
                print(f"registered block type {cls.get_block_type_slug()}")
            return 0
        check_block_name(args.name, "name")
        if args.command == "storage":
            block = StorageBlock(
                base_url=args.base_url,
                endpoint_url=args.endpoint,
                key=os.environ.get(args.key_env) or None,
                secret=os.environ.get(args.secret_env) or None,
                region=args.region,
                options=dict(args.option),
            )
            creds = "with credentials" if block.key or block.secret else "without credentials"
            detail = f"{args.base_url or '(no base URL)'}, endpoint {args.endpoint or '(default)'}, {creds}"
        else:
            block = PipelineBlock.from_yaml(args.file)
            detail = f"pipeline {block.definition['name']!r} from {args.file}"
        block.save(args.name, overwrite=args.overwrite)
        print(f"saved {block.get_block_type_slug()}/{args.name}: {detail}")
        return 0
    except DPipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # Prefect: a block of that name exists (without --overwrite)
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
