"""GPU: a random-weight model of Moondream2's size, images/s and memory by batch size, then
the daemon draining a queue while nvidia-smi samples the GPU's utilisation."""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

from bench import log
from bench.checks import BenchFailure, check_rows, check_sidecars
from bench.daemon import BenchDaemon, daemon_config, thread_env, wait_drained
from bench.measure import GpuSampler
from bench.models import build_random_llava
from bench.report import Result, mib, table
from bench.workload import drop, image_bytes, write_images


def run(args: argparse.Namespace, work: Path) -> Result:
    import torch

    from watcher.backends import load_backend
    from watcher.backends.transformers_backend import TransformersBackend
    from watcher.config import FolderConfig, ModelConfig

    smoke = args.gpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        return Result(
            "gpu",
            [
                "Not run: no CUDA device on this machine. On a GPU machine: "
                "`.venv/bin/python bench/run.py gpu`."
            ],
            {"skipped": True},
            ok=True,
        )
    dtype = "float32" if smoke else "bfloat16"
    base = work / "gpu"
    t0 = time.perf_counter()
    model = build_random_llava(
        base / "model", "smoke" if smoke else "moondream", device=device, dtype=dtype
    )
    if device == "cuda":
        torch.cuda.empty_cache()
    log(
        f"gpu: built the {'small smoke-test' if smoke else 'Moondream2-sized'} model in "
        f"{time.perf_counter() - t0:.0f}s"
    )
    T = args.gpu_tokens
    batches = sorted(set(args.gpu_batches))
    backend = load_backend(
        ModelConfig(
            backend="transformers",
            path=str(model),
            revision=None,
            batch_size=max(batches),
            max_tokens=T,
            device=device,
            dtype=dtype,
        )
    )
    # The sweep sets the batch size on the loaded transformers backend itself.
    assert isinstance(backend, TransformersBackend)
    params = sum(p.numel() for p in backend._model.parameters())
    tasks = FolderConfig(path=Path("/")).tasks(T)
    from PIL import Image

    n_img = args.gpu_images
    imgs = [
        Image.open(io.BytesIO(image_bytes(5 * 10**6 + i, (640, 480)))).convert("RGB")
        for i in range(n_img)
    ]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sweep = {}
    for bs in batches:
        backend.max_batch = bs
        backend.describe(imgs[:bs], tasks)  # warm-up at this shape
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        outs = 0
        t0 = time.perf_counter()
        for s in range(0, n_img, bs):
            out = backend.describe(imgs[s : s + bs], tasks)
            outs += sum(1 for o in out if o[0].strip())
        sync()
        secs = time.perf_counter() - t0
        if outs != n_img:
            raise BenchFailure(f"gpu: {outs} captions for {n_img} images at batch {bs}")
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
        sweep[bs] = {"images_per_s": n_img / secs, "peak_mem": peak}
        log(f"gpu: batch {bs}: {n_img / secs:.2f} images/s, peak {mib(peak)} MiB")
    best = max(sweep, key=lambda b: sweep[b]["images_per_s"])
    backend.close()
    del backend
    if device == "cuda":
        torch.cuda.empty_cache()

    # The daemon draining a queue on the same model: how busy is the GPU?
    folder = base / "watched"
    folder.mkdir()
    n = args.gpu_queue
    staged = write_images(base / "stage", range(6 * 10**6, 6 * 10**6 + n), (640, 480))
    cfg = daemon_config(
        base / "daemon.yaml",
        model=model,
        db=base / "index.db",
        folders=[{"path": str(folder), "settle_seconds": args.pipeline_settle}],
        batch=best,
        max_tokens=T,
        device=device,
        dtype=dtype,
    )
    sampler = GpuSampler().start()
    try:
        with BenchDaemon(cfg, base, env=thread_env(args.torch_threads)) as d:
            t_drop = time.time()
            dropped = drop(staged, folder)
            got = wait_drained(d, folder, n, 3600)
            errors = d.errors()
        t_first = min(e["t"] for e in got)
        t_last = max(e["t"] for e in got)
    finally:
        sampler.stop()
    if errors:
        raise BenchFailure(f"gpu daemon logged errors: {errors[:3]}")
    check_sidecars(dropped)
    check_rows(base / "index.db", dropped)
    # Utilisation from the first batch's start (first sidecar minus one batch's model time)
    # to the last sidecar.
    first_ms = min(got, key=lambda e: e["t"]).get("ms", 0) * best / 1000
    win = sampler.window(t_first - first_ms, t_last)
    util = statistics.mean(s[1] for s in win) if win else None
    mem = max((s[2] for s in win), default=None)
    drain_rate = n / (t_last - t_drop)
    seq = sweep[min(batches)]["images_per_s"]
    speedup = sweep[best]["images_per_s"] / seq
    ok = (util is not None and util >= 90) and speedup >= 3
    lines = [
        f"Random-weight model of Moondream2's size ({params / 1e9:.2f} B parameters: SigLIP "
        f"27 x 1152 at 378 px / patch 14, Phi 24 x 2048, vocab 51200), {dtype}, {T} generated "
        f"tokens per image, {n_img} images per batch size."
        if not smoke
        else f"SMOKE TEST on CPU with a shrunken model ({params / 1e6:.1f} M parameters): checks "
        "the code path only; the figures mean nothing.",
        "",
        *table(
            ["batch", "images/s", "vs batch 1", "peak GPU memory"],
            [
                [
                    bs,
                    f"{v['images_per_s']:.2f}",
                    f"{v['images_per_s'] / seq:.2f}x",
                    f"{mib(v['peak_mem'])} MiB",
                ]
                for bs, v in sweep.items()
            ],
        ),
        "",
        f"Daemon draining {n} images at batch {best}: {drain_rate:.2f} images/s from the drop, "
        f"GPU utilisation {util:.0f}% (mean of nvidia-smi samples from the first batch to the "
        f"last sidecar), {mem:.0f} MiB GPU memory in use."
        if util is not None
        else f"Daemon draining {n} images at batch {best}: {drain_rate:.2f} images/s "
        "(no nvidia-smi: utilisation not sampled).",
        "",
        f"Goals >= 90% busy and batched >= 3x sequential ({speedup:.1f}x): "
        f"{'met' if ok else 'NOT met'}.",
    ]
    return Result(
        "gpu",
        lines,
        {
            "smoke": smoke,
            "params": params,
            "sweep": sweep,
            "best_batch": best,
            "queue": n,
            "drain_images_per_s": drain_rate,
            "gpu_util_mean": util,
            "gpu_mem_mib": mem,
            "speedup": speedup,
            "goal_met": ok,
        },
    )
