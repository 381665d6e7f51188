"""What every ``python -m ppl_gen.bench_*`` command shares: the parser with --threads and
--json, the project's error convention, printing the report and saving the numbers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ppl_gen.core.errors import UserError


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the result to this JSON file")
    return p


def run(args: argparse.Namespace, measure: Callable[[], Any], report: Callable[[Any], str]) -> int:
    """Set the threads, measure, print the report; a UserError is one ``error:`` line, exit 2."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = measure()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
