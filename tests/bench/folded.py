"""Summarise py-spy raw (folded) output: top functions by inclusive and by self samples.

    python tests/bench/folded.py results/<run>/r1-ledger-bot.pyspy-load.txt [--top 30] [--grep litellm]
"""

from __future__ import annotations

import argparse
import collections
import re


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--grep", default="", help="only stacks containing this text")
    args = ap.parse_args()
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in open(args.file):
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or (args.grep and args.grep not in stack):
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        threads[re.sub(r"-\d+|\d+", "N", frames[0])] += count
        names = [re.sub(r" \(.*?:\d+\)$", "", f) + "  " + (re.search(r"\((.*?):\d+\)", f) or [None, ""])[1].split("/")[-1]
                 for f in frames[1:]]
        for name in set(names):
            incl[name] += count
        if names:
            self_[names[-1]] += count
    print(f"{total} samples")
    print("\n-- threads --")
    for name, c in threads.most_common(10):
        print(f"{c / total:6.1%}  {name}")
    print("\n-- inclusive --")
    for name, c in incl.most_common(args.top):
        print(f"{c / total:6.1%}  {name}")
    print("\n-- self --")
    for name, c in self_.most_common(args.top):
        print(f"{c / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
