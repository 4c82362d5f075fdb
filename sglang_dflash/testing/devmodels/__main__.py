"""python -m sglang_dflash.testing.devmodels {tiny-target,random-drafter,random-dflash2-drafter,smollm2} OUT [...]"""

import argparse

from . import dflash2, smollm2, tiny


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sglang_dflash.testing.devmodels")
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
    d2 = sub.add_parser("random-dflash2-drafter")
    d2.add_argument("out")
    d2.add_argument("--target", required=True)
    d2.add_argument("--layers", type=int, default=2)
    d2.add_argument("--block-size", type=int, default=8)
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
    elif args.cmd == "random-dflash2-drafter":
        path = dflash2.build_random_dflash2_drafter(
            args.out, target=args.target, num_layers=args.layers, block_size=args.block_size
        )
    else:
        path = smollm2.convert(args.out, dtype=args.dtype)
    print(path)


if __name__ == "__main__":
    main()
