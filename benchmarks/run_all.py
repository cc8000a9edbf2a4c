"""Run every benchmark in sequence (each prints its table and writes benchmarks/<name>.json).

    python benchmarks/run_all.py [--quick]      # --quick: fewer rounds
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    quick = "--quick" in sys.argv
    rounds = ["--rounds", "6"] if quick else []
    for script, args in [("train_step.py", rounds), ("forward.py", rounds), ("memory.py", []),
                         ("compile_time.py", []), ("first_call.py", rounds), ("blocks.py", rounds),
                         ("generate.py", rounds),
                         ("ecosystem.py", rounds), ("many_adapters.py", rounds),
                         ("qlora.py", rounds), ("fused_loss.py", rounds), ("moe.py", rounds),
                         ("deploy.py", rounds), ("deploy_generate.py", rounds), ("variants.py", rounds)]:
        print(f"\n=== {script} ===", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-W", "ignore", str(HERE / script), *args], check=True)
        print(f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
