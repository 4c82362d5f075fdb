"""CPU lane: run SGLang (and this package) on a machine without a GPU.

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) needs ``sgl_kernel`` and ``torchvision``
to import. Their PyPI builds do not load on a CPU-only torch, so the lane ships import
stand-ins in ``standins/`` and appends that folder to ``sys.path`` at interpreter start
(via a ``.pth`` file written by ``sglang-dflash-cpu-lane install``). Appending, not
prepending, means an installed real package always wins, so a GPU machine never sees
the stand-ins; and nothing happens unless ``SGLANG_USE_CPU_ENGINE=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from pathlib import Path

STUBS_DIR = Path(__file__).resolve().parent / "standins"
PTH_NAME = "sglang_dflash_cpu_lane.pth"
PTH_LINE = "import sglang_dflash.cpu_lane as _l; _l.activate()\n"

# What SGLang needs to run on CPU, and no more. Tests and launch scripts use it.
CPU_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def enabled(environ: os._Environ | dict = os.environ) -> bool:
    return environ.get("SGLANG_USE_CPU_ENGINE", "") == "1"


def activate() -> None:
    """Make the stand-ins importable as a last resort (CPU lane only)."""
    if enabled() and str(STUBS_DIR) not in sys.path:
        sys.path.append(str(STUBS_DIR))


def install(site_packages: str | None = None) -> Path:
    """Write the boot ``.pth`` into ``site_packages`` (default: this interpreter's)."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text(PTH_LINE)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sglang-dflash-cpu-lane", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="write the boot .pth into this environment's site-packages")
    sub.add_parser("env", help="print the environment the CPU lane needs, as shell exports")
    args = parser.parse_args(argv)
    if args.cmd == "install":
        print(f"wrote {install()}")
    else:
        for key, value in CPU_ENV.items():
            print(f"export {key}={value}")


if __name__ == "__main__":
    main()
