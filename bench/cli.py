"""The benchmarks' command line: which to run, at what sizes, and where the report goes."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import (
    ROOT,
    burst,
    export,
    gpu,
    latency,
    log,
    pipeline,
    quiet_logging,
    scale,
    scaleout,
    search,
    web,
    webpages,
)
from bench.checks import BenchFailure
from bench.report import (
    OUT_DIR,
    RESULTS_MD,
    Result,
    append_results,
    git_commit,
    load_avg,
    machine,
    render,
    write_json,
)

DESCRIPTION = "moondream-watcher benchmarks (issue 7): is the model kept busy, does it scale?"
EPILOG = """\
    .venv/bin/python bench/run.py                 # every CPU benchmark at the issue's sizes
    .venv/bin/python bench/run.py pipeline        # one benchmark (pipeline, latency, ..., web)
    .venv/bin/python bench/run.py --quick         # everything, small sizes (a minute or two)
    .venv/bin/python bench/run.py gpu             # on a CUDA machine: a Moondream2-sized model
    .venv/bin/python bench/run.py search          # search at 1,000,000 rows (--rows N)

Speeds are reported as ratios taken in the same run (the machines are noisy); every benchmark
first checks its own outcome (every sidecar written, every row present, the scan found what
it should) and fails instead of reporting a speed when it does not. The report is printed,
written as JSON under bench/out/, and appended to bench/RESULTS.md (with date, machine, git
commit and the exact command) unless --no-record. See bench/README.md.
"""

# Each benchmark, in the order they run: run(args, scratch folder) -> Result.
BENCHMARKS: dict[str, Callable[[argparse.Namespace, Path], Result]] = {
    "pipeline": pipeline.run,
    "latency": latency.run,
    "scale": scale.run,
    "burst": burst.run,
    "gpu": gpu.run,
    "web": web.run,
    "webpages": webpages.run,
    "export": export.run,
    "search": search.run,
    "scaleout": scaleout.run,
}
# export is run by name (`bench/run.py export`): it is about memory, not the model.
CPU_BENCHMARKS = ("pipeline", "latency", "scale", "burst", "web", "webpages")
ALL_BENCHMARKS = tuple(BENCHMARKS)


def size_arg(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "benchmarks",
        nargs="*",
        metavar="BENCHMARK",
        help=f"any of {', '.join(ALL_BENCHMARKS)}, or all (default: the CPU ones; "
        "gpu too when CUDA is there)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: n 64, 1 round, 10 drops, 10k files, 1k burst",
    )
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument(
        "--results",
        type=Path,
        default=RESULTS_MD,
        help="the Markdown file the report is appended to (default bench/RESULTS.md)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=OUT_DIR,
        help="the folder the report's JSON is written to (default bench/out)",
    )
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--note", default="", help="a line to record with the results")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch CPU threads for the tiny model, here and in the daemons "
        "(default 1: its ops are too small to split, and a second OpenMP "
        "thread makes timings erratic on a busy 2-core machine; 0: torch's "
        "default)",
    )
    g = p.add_argument_group("pipeline")
    g.add_argument("--n", type=int, default=200, help="images per round (default 200)")
    g.add_argument(
        "--model",
        choices=("tiny", "small"),
        default="tiny",
        help="tiny: the tests' tiny llava (default; its time is Python overhead, "
        "which holds the GIL); small: a random-weight model whose time goes "
        "to matrix kernels, as a real model's does",
    )
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument(
        "--skip-a",
        action="store_true",
        help="skip (a), the bare loop at batch 1 (slow on --model small)",
    )
    g.add_argument(
        "--batches",
        type=ints,
        default=[1, 4, 8, 16, 32],
        help="batch sizes tried for the best one (default 1,4,8,16,32)",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=120,
        help="tokens generated per image (default 120, the config's max_tokens; "
        "the tiny model always generates exactly this many)",
    )
    g.add_argument(
        "--no-embedding",
        action="store_true",
        help="c and d without search vectors (search.embedding_model: null); default: "
        "they embed every caption with the real all-MiniLM-L6-v2, as a default install does",
    )
    g.add_argument("--image-size", type=size_arg, default=(320, 240))
    g.add_argument(
        "--pipeline-settle",
        type=float,
        default=0.25,
        help="settle_seconds for the throughput daemons (default 0.25)",
    )
    g = p.add_argument_group("latency, burst")
    g.add_argument("--drops", type=int, default=50)
    g.add_argument(
        "--settle", type=float, default=1.0, help="settle_seconds (default 1.0, the config default)"
    )
    g.add_argument("--idle-gap", type=float, default=0.3)
    g.add_argument("--daemon-batch", type=int, default=8)
    g.add_argument("--burst", type=int, default=10_000)
    g.add_argument("--burst-image-size", type=size_arg, default=(96, 72))
    g.add_argument("--burst-batch", type=int, default=32)
    g.add_argument("--burst-tokens", type=int, default=20)
    g.add_argument("--burst-timeout", type=float, default=1800)
    g = p.add_argument_group("web")
    g.add_argument(
        "--web-burst", type=int, default=2000, help="images drained while the API is asked"
    )
    g.add_argument("--web-requests", type=int, default=40, help="interactive requests (at most)")
    g.add_argument("--web-gap", type=float, default=0.2, help="seconds between requests")
    g = p.add_argument_group("scale")
    g.add_argument("--scale-files", type=int, default=100_000)
    g = p.add_argument_group("webpages")
    g.add_argument("--web-images", type=int, default=100_000, help="rows in the synthetic index")
    g = p.add_argument_group("export")
    g.add_argument("--export-rows", type=int, default=1_000_000)
    g.add_argument(
        "--export-formats",
        type=lambda t: [f for f in t.split(",") if f],
        default=["csv", "jsonl", "hf", "kohya"],
    )
    g = p.add_argument_group("search (run it by name: bench/run.py search)")
    g.add_argument("--rows", type=int, default=1_000_000, help="index rows (default 1,000,000)")
    g.add_argument(
        "--search-real",
        type=int,
        default=2000,
        help="captions embedded by the real model (the backfill rate); the other rows' "
        "vectors are derived from them (default 2000)",
    )
    g.add_argument("--search-queries", type=int, default=200, help="queries per mode")
    g.add_argument(
        "--search-db",
        type=Path,
        default=None,
        help="build the index into this file, or reuse it when an earlier run built it "
        "with the same --rows and --search-real (the build takes minutes at 1,000,000)",
    )
    g = p.add_argument_group("gpu")
    g.add_argument("--gpu-batches", type=ints, default=[1, 4, 8, 16])
    g.add_argument("--gpu-tokens", type=int, default=32)
    g.add_argument("--gpu-images", type=int, default=64)
    g.add_argument("--gpu-queue", type=int, default=500)
    g.add_argument(
        "--gpu-smoke",
        action="store_true",
        help="run the gpu benchmark on CPU with a shrunken model (a code check)",
    )
    g = p.add_argument_group("scaleout (needs the [ray] extra; run by name)")
    g.add_argument("--scaleout-n", type=int, default=96, help="images per run (default 96)")
    g.add_argument("--scaleout-batch", type=int, default=8)
    g.add_argument("--scaleout-tokens", type=int, default=8)
    g.add_argument(
        "--scaleout-rows", type=int, default=20_000, help="rows for the driver's write rate"
    )
    args = p.parse_args(argv)
    unknown = [b for b in args.benchmarks if b not in (*ALL_BENCHMARKS, "all")]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(ALL_BENCHMARKS)}, all")
    if args.quick:
        defaults = {
            "n": 64,
            "rounds": 1,
            "drops": 10,
            "scale_files": 10_000,
            "web_images": 10_000,
            "export_rows": 100_000,
            "burst": 1000,
            "gpu_images": 16,
            "gpu_queue": 32,
            "web_burst": 500,
            "rows": 100_000,
            "search_real": 500,
            "scaleout_n": 32,
            "scaleout_rows": 5000,
        }
        for k, v in defaults.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if not args.benchmarks:
        args.benchmarks = list(CPU_BENCHMARKS)
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                args.benchmarks.append("gpu")
    elif "all" in args.benchmarks:
        args.benchmarks = list(ALL_BENCHMARKS)
    return args


def run_one(name: str, args: argparse.Namespace, work: Path) -> Result:
    """One benchmark, its failure as a report, with its time and the machine's load."""
    load0 = load_avg()
    t0 = time.perf_counter()
    try:
        res = BENCHMARKS[name](args, work)
    except BenchFailure as e:
        res = Result(name, [f"FAILED (no speed reported): {e}"], {"error": str(e)}, ok=False)
    res.data["seconds"] = round(time.perf_counter() - t0, 1)
    load1 = load_avg()
    res.data["load_avg"] = [load0, load1]
    res.lines.append(
        f"Machine load (1-minute average, other users included): {load0:.2f} "
        f"at the start, {load1:.2f} at the end, on {os.cpu_count()} cores."
    )
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; print, write and record the report. 0: every benchmark did its
    work (whether or not it met its goal); 1: one failed its own outcome check."""
    # Never the Hub: every model here is built locally (the daemons inherit this).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    started = time.time()
    command = " ".join(
        shlex.quote(a)
        for a in [
            ".venv/bin/python"
            if Path(sys.executable).parent.parent == ROOT / ".venv"
            else sys.executable,
            "bench/run.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    quiet_logging()
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    info = machine()
    commit = git_commit()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="watcher-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"scratch folder {work}")
    results: list[Result] = []
    try:
        for name in args.benchmarks:
            log(f"--- {name}")
            res = run_one(name, args, work)
            results.append(res)
            print(f"\n### {res.name}\n\n" + "\n".join(res.lines) + "\n", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = render(results, info, commit, command, started, args.note)
    write_json(args.out, results, info, commit, command, started)
    if not args.no_record:
        append_results(args.results, text)
        shown = (
            args.results.relative_to(ROOT) if args.results.is_relative_to(ROOT) else args.results
        )
        log(f"appended to {shown}")
    return 0 if all(r.ok for r in results) else 1
