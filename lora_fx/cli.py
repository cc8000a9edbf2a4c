"""Command line: ``lora-fx demo`` (also ``python -m lora_fx demo``).

Example::

    lora-fx demo --steps 60 --out demo_adapter
"""

from __future__ import annotations

import argparse
import sys

from .demo import DemoConfig, run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-fx", description="LoRA as a compiler pass.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="LoRA-tune a tiny Llama on a toy task (no downloads) and save the adapter")
    demo.add_argument("--steps", type=int, default=DemoConfig.steps)
    demo.add_argument("--out", default=DemoConfig.out, help="directory for the saved adapter")
    demo.add_argument("--seed", type=int, default=DemoConfig.seed)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(DemoConfig(steps=args.steps, out=args.out, seed=args.seed), progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
