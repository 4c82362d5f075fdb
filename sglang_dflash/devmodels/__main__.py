"""python -m sglang_dflash.devmodels {tiny-target,random-drafter,smollm2} OUT [...]"""

import argparse

from . import smollm2, tiny


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sglang_dflash.devmodels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny-target")
    t.add_argument("out")
    t.add_argument("--dtype", default="float32")
    d = sub.add_parser("random-drafter")
    d.add_argument("out")
    d.add_argument("--target", required=True)
    d.add_argument("--layers", type=int, default=1)
    d.add_argument("--block-size", type=int, default=8)
    d.add_argument("--dtype", default="float32")
    s = sub.add_parser("smollm2")
    s.add_argument("out")
    s.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if args.cmd == "tiny-target":
        path = tiny.build_tiny_target(args.out, dtype=args.dtype)
    elif args.cmd == "random-drafter":
        path = tiny.build_random_drafter(
            args.out, target=args.target, num_layers=args.layers, block_size=args.block_size, dtype=args.dtype
        )
    else:
        path = smollm2.convert(args.out, dtype=args.dtype)
    print(path)


if __name__ == "__main__":
    main()
