"""Create or update the Hugging Face Space that runs PrefLoop, from this checkout, in one command.

    HF_TOKEN=hf_... python scripts/deploy_space.py me/prefloop
    HF_TOKEN=hf_... python scripts/deploy_space.py me/prefloop --hardware l40sx1 \\
        --var PREFLOOP_HUB_DATASET=me/prefloop-votes --var PREFLOOP_HUB_MODEL=me/prefloop-adapter \\
        --var PREFLOOP_ANNOTATORS=org:my-team

Creates the Space (Docker SDK) if it does not exist, uploads the checkout in one commit through
the Hub's HTTP API (binary files go through its large-file storage by themselves; the virtual
environment, data and caches stay here), sets the given variables, and asks for the hardware.
Secrets are not copied: set HF_TOKEN in the Space's settings (read access to the model, write
access to the dataset and model repos).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORED = [".venv/*", "data/*", ".git/*", "**/__pycache__/*", "*.pyc", ".pytest_cache/*", ".ruff_cache/*",
           "*.egg-info/*", "*.log", ".whl/*", ".gl/*", "build/*"]


def deploy(repo_id: str, api, hardware: str | None = None, variables: dict[str, str] | None = None,
           private: bool = False, folder: Path = ROOT) -> str:
    """Create or update the Space; returns the commit's URL."""
    api.create_repo(repo_id, repo_type="space", space_sdk="docker", private=private, exist_ok=True)
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True,
                                  text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = "a checkout"
    info = api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=str(folder),
                             ignore_patterns=IGNORED, commit_message=f"PrefLoop {revision}")
    for key, value in (variables or {}).items():
        api.add_space_variable(repo_id, key, value)
    if hardware:
        api.request_space_hardware(repo_id, hardware)
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> int:
    from huggingface_hub import HfApi

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", help="the Space's id, e.g. me/prefloop")
    p.add_argument("--hardware", default=None, help="e.g. l40sx1, a10g-large, a100-large (see the README's plan)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a Space variable (repeat)")
    p.add_argument("--private", action="store_true", help="create the Space private")
    args = p.parse_args(argv)
    token = os.environ.get("HF_TOKEN")
    if not token:
        print("deploy_space: set HF_TOKEN to a token with write access to your Spaces", file=sys.stderr)
        return 2
    variables = {}
    for v in args.var:
        name, sep, value = v.partition("=")
        if not sep or not name:
            print(f"deploy_space: --var {v!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        variables[name] = value
    url = deploy(args.space, HfApi(token=token), args.hardware, variables, args.private)
    print(f"uploaded: {url}\nthe Space builds now: https://huggingface.co/spaces/{args.space}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
