"""Benchmark the repository tools (issue 22) on a synthetic 5,000-file repository.

    .venv/bin/python tests/bench/repo_tools.py            # 5,000 files, 300 calls per tool
    .venv/bin/python tests/bench/repo_tools.py --files 20000 --calls 100

The repository is made from tests/fixtures/gl-publisher: its files copied, renamed and varied
until there are ``--files`` of them (Kotlin, Markdown, SQL, YAML in the fixture's proportions
and sizes), under a git commit so it is read like a real checkout. Each measure runs in a fresh
``python`` (so RSS is the index's, not this script's), and reports:

  build      seconds to index it (RepoIndex.build), and the process's RSS before and after
  latency    p50 / p95 per tool over ``--calls`` calls with varied arguments, on that index
  round      what one tool round adds to an answer: the prompt tokens of the second request
             beyond the first (tool definitions, the assistant's call, a capped result), and
             its dollars at the model's prices with the first request's prefix read from the
             prompt cache (Anthropic's cache reads at 0.1x) versus not

CPU per answer with LEDGER_BOT_REPO unset is run.py's ``cpu`` scenario, compared across
commits; with it set (the model never calling a tool): ``run.py --only cpu --env
LEDGER_BOT_REPO=tests/fixtures/gl-publisher``. Results: a table on stdout and
tests/bench/results/repo-tools-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "gl-publisher"

WORKER = textwrap.dedent("""
    import json, os, random, statistics, sys, time
    sys.path.insert(0, sys.argv[1])
    import psutil
    import ledger_bot as lb
    from pathlib import Path

    root, calls = Path(sys.argv[2]), int(sys.argv[3])
    me = psutil.Process()
    before = me.memory_info().rss
    t0 = time.perf_counter()
    index = lb.RepoIndex.build(root, "https://github.com/wealthsimple/oracle-gl-publisher")
    built = time.perf_counter() - t0
    after = me.memory_info().rss
    paths = list(index.paths)
    rng = random.Random(7)
    words = ["reversal", "idempotency", "TradeBuy", "ATTRIBUTE6", "externalSourceId", "GL_INTERFACE",
             "batch", "ImpactBuild", "Kafka topic", "retry", "period", "accrual", "consumer group",
             "ReversalImpactBuilder", "tradeId", "segment6", "EF04", "reprocess"]
    tables = ["GL_INTERFACE", "GL_JE_LINES", "GL_JE_HEADERS", "GL_CODE_COMBINATIONS", None]
    def args(name):
        if name == "search_adrs":
            return {"query": rng.choice(words)}
        if name == "search_code":
            a = {"query": " ".join(rng.sample(words, 2))}
            if rng.random() < 0.3:
                a["path_glob"] = rng.choice(["*.kt", "docs/*", "queue-processor/*"])
            return a
        if name == "read_file":
            start = rng.randint(1, 40)
            return {"path": rng.choice(paths), "start_line": start, "end_line": start + 40}
        if name == "get_schema_info":
            t = rng.choice(tables)
            return {"table": t} if t else {}
        return {"query": rng.choice(words)} if rng.random() < 0.7 else {}
    latency = {}
    for name in lb.TOOLS:
        times = []
        for _ in range(calls):
            arguments = json.dumps(args(name))
            t = time.perf_counter()
            lb.run_tool(index, name, arguments)
            times.append(time.perf_counter() - t)
        times.sort()
        latency[name] = {"p50_ms": round(statistics.median(times) * 1000, 2),
                         "p95_ms": round(times[int(len(times) * 0.95) - 1] * 1000, 2)}
    # One tool round: the second request's extra prompt tokens, and its price.
    count = lb.token_counter("bedrock-claude-4.5-sonnet")
    result = lb.run_tool(index, "search_code", json.dumps({"query": "ReversalImpactBuilder externalSourceId"}))
    call = lb.ToolCall("tooluse_1", "search_code", json.dumps({"query": "ReversalImpactBuilder externalSourceId"}))
    extra = (count(json.dumps(lb.TOOL_SCHEMAS)) + count(lb.TOOLS_PROMPT)
             + lb.message_tokens(lb.assistant_tool_turn("", [call]), count)
             + lb.message_tokens({"role": "tool", "content": result.text}, count))
    schemas = count(json.dumps(lb.TOOL_SCHEMAS)) + count(lb.TOOLS_PROMPT)
    prefix = lb.RESERVE_PROMPT_TOKENS  # the system prompt, the whole shipped knowledge, a thread
    model = "bedrock-claude-4.5-sonnet"
    cached = lb.cost_usd(model, lb.Usage(prompt_tokens=prefix + extra, cached_tokens=prefix + schemas,
                                         completion_tokens=60))
    uncached = lb.cost_usd(model, lb.Usage(prompt_tokens=prefix + extra, completion_tokens=60))
    print(json.dumps({"files": len(paths), "left_out": dict(index.left_out), "build_s": round(built, 2),
                      "rss_before_mib": round(before / 2**20, 1), "rss_after_mib": round(after / 2**20, 1),
                      "index_rss_mib": round((after - before) / 2**20, 1), "latency": latency,
                      "round_extra_prompt_tokens": extra, "tool_definitions_tokens": schemas,
                      "round_usd_cached": round(cached, 5), "round_usd_uncached": round(uncached, 5)}))
""")


def synthesise(target: Path, files: int, seed: int = 7) -> None:
    """A repository of ``files`` text files made from the fixture's, committed to git."""
    rng = random.Random(seed)
    sources = [p for p in FIXTURE.rglob("*") if p.is_file()]
    shutil.copytree(FIXTURE, target)
    made = len(sources)
    while made < files:
        source = rng.choice(sources)
        rel = source.relative_to(FIXTURE)
        variant = f"v{made}"
        text = source.read_text(encoding="utf-8").replace("ImpactBuilder", f"{variant.title()}ImpactBuilder")
        dest = target / rel.parent / f"{variant}" / f"{variant.title()}{rel.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
        made += 1
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(target), "GIT_AUTHOR_NAME": "bench",
           "GIT_AUTHOR_EMAIL": "bench@example.com", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@example.com"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "synthetic"]):
        subprocess.run(["git", "-C", str(target), *args], check=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=5_000)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "oracle-gl-publisher"
        synthesise(repo, args.files)
        size = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts)
        out = subprocess.run([sys.executable, "-c", WORKER, str(ROOT), str(repo), str(args.calls)],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["text_mb"] = round(size / 1e6, 1)
    print(f"{result['files']} files, {result['text_mb']} MB of text: built in {result['build_s']} s, "
          f"index RSS +{result['index_rss_mib']} MiB ({result['rss_before_mib']} -> {result['rss_after_mib']} MiB)")
    print("tool                   p50 ms   p95 ms")
    for name, lat in result["latency"].items():
        print(f"{name:<22} {lat['p50_ms']:>7} {lat['p95_ms']:>8}")
    print(f"one tool round: +{result['round_extra_prompt_tokens']} prompt tokens "
          f"(tool definitions {result['tool_definitions_tokens']}), "
          f"${result['round_usd_cached']} with the prefix cached, ${result['round_usd_uncached']} without")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (results / f"repo-tools-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
