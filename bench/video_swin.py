"""Video Swin-T forward latency and peak memory: vidsift's ``VideoSwinTransformer`` vs torchvision swin3d_t.

Both models hold the same weights (a random torchvision init mapped through our checkpoint filter) and are
timed in the same process, interleaved repeat by repeat, so machine load hits both alike; the figures are
medians and the verdict is the ratio ours / torchvision (floor: <= 0.8 with equal output). Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, the growth of the RSS high-water mark (reset just
before the call) over one forward in a fresh subprocess per model.

    python -m bench.video_swin                      # CPU (and CUDA when available), both shapes
    python -m bench.video_swin --repeats 7 --device cpu --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from torchvision.models.video import swin3d_t  # noqa: E402

from bench.record import BenchRecord, add_record_args, col, format_cell  # noqa: E402
from models.video_swin import VideoSwinTransformer, convert_checkpoint  # noqa: E402

DEFAULT_SHAPES = ("1x3x16x224x224", "1x3x8x112x112")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not BxCxTxHxW") from exc
    if len(shape) != 5 or shape[1] != 3:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not Bx3xTxHxW")
    return shape


def build_models(weights: dict[str, torch.Tensor], device: str):
    """torchvision swin3d_t and ours with identical weights, eval mode, on ``device``, without random init."""
    with torch.device("meta"):
        tv = swin3d_t()
        ours = VideoSwinTransformer()
    tv.load_state_dict(weights, assign=True)
    ours.load_state_dict(convert_checkpoint(weights, "torchvision"), strict=True, assign=True)
    return tv.eval().to(device), ours.eval().to(device)


def tv_features(tv, x: torch.Tensor) -> torch.Tensor:
    """torchvision's pre-head features: ``features`` → ``norm`` (what our ``forward_features`` returns)."""
    return tv.norm(tv.features(tv.patch_embed(x)))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_models(tv, ours, x: torch.Tensor, repeats: int, warmup: int, device: str) -> dict:
    """Interleaved timings (seconds) of both models, plus max abs difference of their outputs."""
    runs = {"torchvision": lambda: tv_features(tv, x), "vidsift": lambda: ours.forward_features(x)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        outs = {name: fn() for name, fn in runs.items()}
        diff = (outs["torchvision"] - outs["vidsift"]).abs().max().item()
        del outs
        for _ in range(warmup):
            for fn in runs.values():
                fn()
        for i in range(repeats):
            order = list(runs) if i % 2 == 0 else list(runs)[::-1]
            for name in order:
                _sync(device)
                start = time.perf_counter()
                runs[name]()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return {"times": times, "max_abs_diff": diff}


def cuda_peak_memory(model_fn, x: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        model_fn(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_child(weights_path: str, which: str, shape: tuple[int, ...]) -> None:
    """Subprocess body: build one model, run one CPU forward, print its peak RSS growth in bytes.

    The kernel's RSS high-water mark is reset (``/proc/self/clear_refs`` ← 5) just before the forward, so
    loading and construction peaks don't count.
    """
    weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    tv, ours = build_models(weights, "cpu")
    model_fn = (lambda v: tv_features(tv, v)) if which == "torchvision" else ours.forward_features
    del weights
    with torch.inference_mode():  # first-call set-up (thread pools, kernel caches) is not the forward's
        model_fn(torch.randn(1, 3, 2, 32, 32))
    x = torch.randn(shape)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kib("VmRSS")
    with torch.inference_mode():
        model_fn(x)
    peak = _proc_status_kib("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def cpu_peak_memory(weights_path: str, which: str, shape: tuple[int, ...]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "bench.video_swin",
        "--_memory-child",
        which,
        weights_path,
        "x".join(map(str, shape)),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {which} {shape} failed: {proc.stderr[-2000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


def measure_shape(tv, ours, shape, device: str, args, weights_path: str) -> dict:
    """Timing (and peak memory unless ``--no-memory``) of both models on one input shape."""
    torch.manual_seed(1)
    x = torch.randn(shape, device=device)
    timing = time_models(tv, ours, x, args.repeats, args.warmup, device)
    med = {name: statistics.median(ts) for name, ts in timing["times"].items()}
    row = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "shape": "x".join(map(str, shape)),
        "torchvision_s": med["torchvision"],
        "vidsift_s": med["vidsift"],
        "torchvision_ms": med["torchvision"] * 1e3,
        "vidsift_ms": med["vidsift"] * 1e3,
        "time_ratio": med["vidsift"] / med["torchvision"],
        "max_abs_diff": timing["max_abs_diff"],
        "times": timing["times"],
    }
    if not args.no_memory:
        if device == "cpu":
            mem_tv = cpu_peak_memory(weights_path, "torchvision", shape)
            mem_ours = cpu_peak_memory(weights_path, "vidsift", shape)
        else:
            mem_tv = cuda_peak_memory(lambda v, m=tv: tv_features(m, v), x)
            mem_ours = cuda_peak_memory(ours.forward_features, x)
        row.update(torchvision_peak_mib=mem_tv / 2**20, vidsift_peak_mib=mem_ours / 2**20,
                   memory_ratio=mem_ours / max(mem_tv, 1))
    mem = (f"  peak MiB tv {row['torchvision_peak_mib']:.0f} ours {row['vidsift_peak_mib']:.0f}"
           f" ({row['memory_ratio']:.2f}x)" if "memory_ratio" in row else "")
    print(f"[{row['device']}] {row['shape']}: torchvision {row['torchvision_ms']:.1f} ms, "
          f"vidsift {row['vidsift_ms']:.1f} ms -> {row['time_ratio']:.2f}x, "
          f"max|diff| {row['max_abs_diff']:.1e}{mem}", flush=True)
    return row


COLUMNS = [col("device", "device"), col("shape", "input"), col("torchvision_ms", "torchvision ms", "{:.1f}"),
           col("vidsift_ms", "vidsift ms", "{:.1f}"), col("time_ratio", "time ratio", "{:.2f}x"),
           col("torchvision_peak_mib", "peak MiB tv", "{:.0f}"),
           col("vidsift_peak_mib", "peak MiB ours", "{:.0f}"),
           col("memory_ratio", "memory ratio", "{:.2f}x"), col("max_abs_diff", "max abs diff", "{:.1e}")]


def record_results(record: BenchRecord, results: list[dict], args) -> None:
    floor_ok = all(r["time_ratio"] <= 0.8 and r["max_abs_diff"] <= 1e-4 for r in results)
    print(f"floor (ratio <= 0.80 with max|diff| <= 1e-4): {'met' if floor_ok else 'NOT met'}")
    memory = ("peak memory: growth of the RSS high-water mark over one forward in a fresh subprocess per "
              "model (CPU), torch.cuda.max_memory_allocated (CUDA)")
    rows = [{k: v for k, v in r.items() if k != "times"} for r in results]
    record.table("results", columns=COLUMNS, rows=rows,
                 sample_size=f"batch 1 random input per shape, median of {args.repeats} interleaved repeats "
                             f"after {args.warmup} warm-up, {torch.get_num_threads()} torch threads; "
                             f"{memory}",
                 baseline="torchvision swin3d_t (patch_embed, features, norm) with identical weights, same "
                          "process, same inputs", filtering="none")
    record.extra.update(torch=torch.__version__, times={r["shape"]: r["times"] for r in results})
    record.add_headline("Video Swin-T vs torchvision swin3d_t",
                        "<= 0.8x torchvision's time, max|diff| <= 1e-4",
                        "; ".join(f"{r['time_ratio']:.2f}x at {r['shape']} ({r['device']}), max|diff| "
                                  f"{r['max_abs_diff']:.1e}" for r in results), "yes" if floor_ok else "no")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto = cpu, plus cuda when available",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    add_record_args(parser, "video_swin")
    parser.add_argument("--_memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_child:
        which, path, shape = args._memory_child
        _memory_child(path, which, parse_shape(shape))
        return 0
    record = BenchRecord.start("video_swin", sys.argv[1:] if argv is None else argv)

    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "auto" and torch.cuda.is_available():
        devices.append("cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda asked for but CUDA is not available")

    torch.manual_seed(0)
    weights = swin3d_t().state_dict()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = os.path.join(tmp, "swin3d_t.pth")
        torch.save(weights, weights_path)
        for device in devices:
            tv, ours = build_models(weights, device)
            results += [measure_shape(tv, ours, shape, device, args, weights_path) for shape in args.shapes]
            del tv, ours
    for r in results:
        print(" | ".join(format_cell(r.get(c["key"]), c["fmt"]) for c in COLUMNS))
    record_results(record, results, args)
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
