"""Command line: ``lora-fx demo``, ``merge``, ``package`` and ``cache`` (also ``python -m lora_fx ...``).

Example::

    lora-fx demo --steps 60 --out demo_adapter
    lora-fx merge --base ./model --adapter ./demo_adapter --out ./merged
    lora-fx package --base ./model --adapter ./demo_adapter --out ./model.pt2 [--unmerged]
    lora-fx cache info | clear
"""

from __future__ import annotations

import argparse
import sys

from .capture.disk import cache_info, clear_capture_cache
from .demo import DemoConfig, run_demo
from .deploy.merge_dir import merge_model_dir
from .deploy.package import package_model_dir
from .errors import LoraFxError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-fx", description="LoRA as a compiler pass.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="LoRA-tune a tiny Llama on a toy task (no downloads) and save the adapter")
    demo.add_argument("--steps", type=int, default=DemoConfig.steps)
    demo.add_argument("--out", default=DemoConfig.out, help="directory for the saved adapter")
    demo.add_argument("--seed", type=int, default=DemoConfig.seed)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    merge = sub.add_parser("merge", help="merge a PEFT adapter into a local transformers model directory")
    merge.add_argument("--base", required=True, help="transformers model directory")
    merge.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    merge.add_argument("--out", required=True, help="directory for the merged model")
    merge.add_argument("--force", action="store_true", help="replace a non-empty --out")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    pkg = sub.add_parser("package", help="compile a transformers model directory with a PEFT adapter into an "
                                         "AOTInductor package (.pt2) that runs without lora_fx")
    pkg.add_argument("--base", required=True, help="transformers model directory")
    pkg.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    pkg.add_argument("--out", required=True, help="the .pt2 file to write")
    pkg.add_argument("--unmerged", action="store_true", help="keep the LoRA branches (adapters swappable later)")
    pkg.add_argument("--force", action="store_true", help="replace an existing --out")
    pkg.add_argument("--no-progress", action="store_true", help="no progress lines")
    cache = sub.add_parser("cache", help="the on-disk capture cache: where it is and how big (info), or empty it "
                                         "(clear)")
    cache.add_argument("action", choices=["info", "clear"])
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(DemoConfig(steps=args.steps, out=args.out, seed=args.seed), progress=not args.no_progress)
    elif args.command == "merge":
        try:
            report = merge_model_dir(args.base, args.adapter, args.out, force=args.force,
                                     progress=not args.no_progress)
        except LoraFxError as e:
            print(f"lora-fx merge: {e}", file=sys.stderr)
            return 2
        print(report)
        print(f"merged model saved to {args.out}/")
    elif args.command == "package":
        try:
            package_model_dir(args.base, args.adapter, args.out, unmerged=args.unmerged, force=args.force,
                              progress=not args.no_progress)
        except LoraFxError as e:
            print(f"lora-fx package: {e}", file=sys.stderr)
            return 2
        print(f"package saved to {args.out} (torch._inductor.aoti_load_package to run it)")
    elif args.command == "cache":
        try:
            print(f"removed {clear_capture_cache()} capture cache entries" if args.action == "clear"
                  else cache_info())
        except ValueError as e:
            print(f"lora-fx cache: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
