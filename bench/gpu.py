"""The GPU path, measured from one prepared script: decode, embed, the Ray Data pipeline, training steps,
FAISS and 16-core scaling, each against its baseline in the same run (issue #25).

    python -m bench.gpu --out docs/data/gpu.json       # one CUDA GPU (H100: <= 8 min); refuses without CUDA
    python -m bench.gpu --dry-run --out /tmp/gpu.json  # every step at toy size on CPU (the CI test runs it)

Sections (``--sections`` picks some; each has its own time budget, ``--budget NAME=SECONDS``):

- ``decode``: NVDEC (torchcodec ``device="cuda"``) vs CPU torchcodec with every core, frames/s, 224 px / 720p;
- ``embed``: the encoder's forward on device-resident clips, fp32 vs bf16 autocast: clips/s, busy %, memory;
- ``pipeline``: ``workflows.embed.run_embed`` (decode in CPU actors, the encoder in a GPU actor) vs the
  sequential decode-then-encode loop and vs the encoder alone on pre-decoded batches; busy % during the run;
- ``train``: one optimizer step (``pipeline.training.loop.train_step``) in fp32 vs bf16 autocast, the tiny and
  the base CLIP4Clip configs (random init: step *time* only, no weights can be downloaded);
- ``faiss``: ``IVF...,PQ...`` train + add + search on the GPU vs the CPU with every core (``--faiss-n``; the
  default is the largest size whose CPU build, extrapolated from a small calibration build, fits the budget);
- ``scaling``: ingest (transcode) and decode with 1, 4, 8 and 16 workers.

A section that runs over its budget stops at its next step and keeps what it measured; a section that fails
records its error and the rest still run. ``--dry-run`` runs every section with ``device="cpu"`` at toy size
(so the script cannot rot); its figures mean nothing and it never writes ``docs/data/gpu.json`` by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray
import torch

from bench.decode import make_video, run_round_robin
from bench.embed import iter_samples
from bench.embed import make_corpus as make_embed_corpus
from bench.index import Mixture
from bench.ingest import make_corpus as make_ingest_corpus
from bench.ingest import start_ray, time_ray
from bench.record import BenchRecord, add_record_args, col, default_json, format_cell
from index.factory import make_index, training_size
from index.tuning import recall_at_k
from models import create_model
from pipeline.clips import sample_clips
from pipeline.decode import TorchCodecBackend, probe_video
from pipeline.embedding import EncodeClipsStage
from pipeline.sampling import SamplingConfig
from pipeline.training import TrainConfig, collate
from pipeline.training.loop import setup_worker, train_step
from runtime.progress import Progress
from runtime.ray_connect import connect_ray
from runtime.threads import set_faiss_threads
from workflows.embed import run_embed

SECTIONS = ("decode", "embed", "pipeline", "train", "faiss", "scaling")
# Seconds per section on one H100 (sum 410 s: with imports and Ray's start-ups the run stays under 8 minutes).
REAL_BUDGETS = {"decode": 45, "embed": 35, "pipeline": 120, "train": 45, "faiss": 100, "scaling": 65}
DRY_BUDGETS = {name: 120 for name in SECTIONS}
FAISS_SIZES = (10_000_000, 5_000_000, 2_000_000, 1_000_000, 500_000, 200_000, 100_000)
PIPELINE_FLOOR, BUSY_FLOOR, MODEL_ONLY_FLOOR = 1.3, 70.0, 0.8
NO_CUDA = ("bench.gpu: CUDA is not available here (torch.cuda.is_available() is False). The real run "
           "measures a GPU and refuses to run without one; `python -m bench.gpu --dry-run` runs every step "
           "at toy size on CPU.")


# --------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass
class Settings:
    """Sizes of every section: the real run's, or the dry run's toy sizes (same code, ``device="cpu"``)."""

    dry_run: bool
    device: str
    cores: int  # compute threads of the CPU baselines (torch, FFmpeg, OpenMP)
    ray_cpus: int
    workdir: Path
    budgets: dict[str, float]
    workers: list[int]
    decode_videos: dict[str, tuple[int, int]]  # label -> (height, width) of a synthetic H.264 video
    decode_seconds: int
    decode_repeats: int
    embed_model: str
    embed_batch: int  # videos per batch
    sampling: dict[str, Any]
    arm_seconds: float  # how long each timed arm of embed / train runs (busy % needs a few seconds)
    pipeline_videos: int
    pipeline_video: tuple[float, int, int]  # (seconds, px, fps)
    decoders: int
    train_models: list[tuple[str, int, int]]  # (model, batch, frames per video)
    faiss_n: int | None  # None: the largest of faiss_sizes that fits the budget (see faiss_size)
    faiss_sizes: tuple[int, ...]
    faiss_calibration_n: int
    faiss_dim: int
    faiss_factory: str
    faiss_queries: int
    faiss_nprobe: int
    scaling_videos: int
    scaling_video: tuple[int, int, float]  # (width, height, seconds)


def settings_for(args: argparse.Namespace) -> Settings:
    cores = os.cpu_count() or 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vidsift_bench_gpu_"))
    workdir.mkdir(parents=True, exist_ok=True)
    budgets = dict(DRY_BUDGETS if args.dry_run else REAL_BUDGETS)
    budgets.update(args.budget)
    if args.dry_run:
        return Settings(
            # one compute thread: OpenMP and torch threads spin badly on a shared, oversubscribed CI machine
            dry_run=True, device="cpu", cores=1, ray_cpus=2, workdir=workdir, budgets=budgets,
            workers=[1, 2], decode_videos={"toy 64 px": (64, 96)}, decode_seconds=1, decode_repeats=1,
            embed_model="clip4clip-meanP-tiny", embed_batch=4,
            sampling={"num_clips": 1, "frames_per_clip": 4, "mode": "clip4clip", "max_frames": 4,
                      "max_fps": 2.0},
            arm_seconds=0.2, pipeline_videos=4, pipeline_video=(2.0, 64, 10), decoders=1,
            train_models=[("clip4clip-meanP-tiny", 4, 4)], faiss_n=args.faiss_n,
            faiss_sizes=(4_000, 2_000, 1_000), faiss_calibration_n=1_000, faiss_dim=32,
            faiss_factory="IVF8,PQ4x4", faiss_queries=50, faiss_nprobe=4, scaling_videos=4,
            scaling_video=(96, 64, 1.0))
    return Settings(
        dry_run=False, device="cuda", cores=cores, ray_cpus=cores, workdir=workdir, budgets=budgets,
        workers=sorted({w for w in (1, 4, 8, 16) if w <= cores} | {1}),
        decode_videos={"224 px": (224, 398), "720p": (720, 1280)}, decode_seconds=10, decode_repeats=3,
        embed_model=args.model, embed_batch=32,
        sampling={"num_clips": 1, "frames_per_clip": 12, "mode": "clip4clip", "max_frames": 12,
                  "max_fps": 1.0},
        arm_seconds=5.0, pipeline_videos=args.pipeline_videos, pipeline_video=(8.0, 240, 25),
        decoders=max(1, cores - 4), train_models=[("clip4clip-meanP-tiny", 64, 8), (args.model, 32, 12)],
        faiss_n=args.faiss_n, faiss_sizes=FAISS_SIZES, faiss_calibration_n=100_000, faiss_dim=256,
        faiss_factory=args.faiss_factory, faiss_queries=10_000,
        faiss_nprobe=16, scaling_videos=96, scaling_video=(320, 240, 4.0))


# ------------------------------------------------------------------------------------ budget, sections


class Budget:
    """A section's time budget: sections ask :meth:`allows` before each step and stop cleanly when not."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.t0 = time.perf_counter()
        self.stopped_before: str | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, step: str) -> bool:
        """True while there is time left; else remembers (and prints) the first step it stopped before."""
        if self.left() > 0:
            return True
        if self.stopped_before is None:
            self.stopped_before = step
            print(f"[bench.gpu]   over budget ({self.seconds:.0f} s): stopping before {step}", flush=True)
        return False


@dataclasses.dataclass
class SectionOut:
    """What a section measured: rows per table, and notes for the summary."""

    tables: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.tables.setdefault(table, []).append(row)
        print(f"[bench.gpu]   {table}: " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_section(name: str, fn: Callable[[Settings, Budget, SectionOut], None], settings: Settings,
                out: SectionOut) -> dict[str, Any]:
    """Run one section under its budget; a failure is recorded (with its traceback printed), not raised, so
    that the other sections still run. Returns the section's status row."""
    budget = Budget(settings.budgets[name])
    print(f"[bench.gpu] section {name} (budget {budget.seconds:.0f} s)", flush=True)
    status, problem = "ok", []
    try:
        fn(settings, budget, out)
    except Exception as exc:  # noqa: BLE001 - a bench section's failure is its result; the rest still run
        traceback.print_exc()
        status, problem = "error", [f"{type(exc).__name__}: {exc}"]
    finally:
        if ray.is_initialized():  # the next section starts clean: no actor holds GPU memory or cores
            ray.shutdown()
    if status == "ok" and budget.stopped_before:
        status, problem = "over budget", [f"stopped before {budget.stopped_before}"]
    elif status == "ok" and budget.left() < 0:  # its last step ran past the budget: every figure is in
        status, problem = "over budget", [f"finished {-budget.left():.0f} s late"]
    detail = "; ".join([*out.notes, *problem])
    row = {"section": name, "status": status, "seconds": budget.elapsed(), "budget_s": budget.seconds,
           "detail": detail}
    print(f"[bench.gpu] section {name}: {status} in {row['seconds']:.1f} s {detail}", flush=True)
    return row


# ------------------------------------------------------------------------------------------ measuring


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_for(fn: Callable[[], Any], seconds: float, device: str, min_iters: int = 3) -> tuple[int, float]:
    """Call ``fn`` once to warm up, then repeatedly for at least ``seconds`` and ``min_iters`` calls (the
    device synchronised after each: every call is a finished batch); returns (calls, elapsed seconds)."""
    fn()
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        sync(device)
        iters += 1
    return iters, time.perf_counter() - t0


def busy_reader(device: str) -> tuple[str, Callable[[], tuple[float, float]]]:
    """(source, read) where ``read()`` gives (busy %, memory used MB) of the device: NVML (nvidia-ml-py), else
    ``torch.cuda.utilization``; on CPU (the dry run) the host's CPU % and used memory, so the code runs."""
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        try:
            import pynvml  # nvidia-ml-py, the `gpu` extra

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return "nvml", lambda: (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                                    pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
        except ImportError as exc:
            reason = exc
        except pynvml.NVMLError as exc:
            reason = exc
        print(f"[bench.gpu] NVML unavailable ({reason}); busy % from torch.cuda.utilization", flush=True)
        return "torch.cuda.utilization", lambda: (float(torch.cuda.utilization(index)),
                                                  torch.cuda.memory_reserved(index) / 2**20)
    psutil.cpu_percent(None)
    return "host CPU % (dry run)", lambda: (psutil.cpu_percent(None), psutil.virtual_memory().used / 2**20)


class BusySampler:
    """Samples (time, busy %, memory MB) of the device every ``interval_s`` on a thread during the block."""

    def __init__(self, device: str, interval_s: float = 0.2):
        self.source, self.read = busy_reader(device)
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = 0.0

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            busy, mem = self.read()
            self.samples.append((time.perf_counter() - self.t0, busy, mem))

    def __enter__(self) -> BusySampler:
        self.t0 = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        busy, mem = self.read()  # one sample at the end: a block shorter than the interval still has one
        self.samples.append((time.perf_counter() - self.t0, busy, mem))

    def busy_mean(self, since_s: float = 0.0) -> float:
        """Mean busy % over the samples taken ``since_s`` seconds or more after the block started."""
        values = [b for t, b, _ in self.samples if t >= since_s] or [b for _, b, _ in self.samples]
        return statistics.fmean(values)

    def memory_max_mb(self) -> float:
        return max(m for _, _, m in self.samples)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float | None:
    """Peak memory torch allocated on the device since :func:`reset_peak` (None on CPU: no such counter)."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


# ------------------------------------------------------------------------------------------- sections


def section_decode(s: Settings, budget: Budget, out: SectionOut) -> None:
    """Every frame of a synthetic H.264 video through vidsift's torchcodec backend (frames come back to host
    memory, as the pipeline uses them): on the device (NVDEC) vs on the CPU with every core."""
    for label, (height, width) in s.decode_videos.items():
        if not budget.allows(f"the {label} video"):
            return
        path = s.workdir / f"decode-{height}x{width}.mp4"
        if not path.exists():
            make_video(path, s.decode_seconds, keyint_s=1, fps=30, size=(height, width))
        meta = probe_video(str(path))
        times = meta.frame_times + 0.5 / meta.fps  # the middle of every frame's interval
        arms = {f"cpu, {s.cores} threads": TorchCodecBackend("cpu", num_threads=s.cores),
                f"{s.device} (NVDEC)" if s.device != "cpu" else "device arm (cpu in dry run)":
                    TorchCodecBackend(s.device, num_threads=0 if s.device != "cpu" else 1)}
        methods = {name: partial(backend.decode_times, str(path), times, meta)
                   for name, backend in arms.items()}
        for fn in methods.values():
            fn()  # warm-up: decoder creation, CUDA context
        ms, outputs = run_round_robin(methods, s.decode_repeats)
        base_name = next(iter(arms))
        base = outputs[base_name].frames.astype(np.int16)
        for name in arms:
            fps = len(times) / (ms[name] / 1000.0)
            diff = float(np.abs(outputs[name].frames.astype(np.int16) - base).mean())
            out.add("decode", {"video": f"{label} ({width}x{height}, {len(times)} frames)", "arm": name,
                               "frames_per_s": fps, "vs_cpu": ms[base_name] / ms[name],
                               "mean_abs_diff": diff})


def section_embed(s: Settings, budget: Budget, out: SectionOut) -> None:
    """The encoder's forward (``encode_clips`` + ``video_from_clips``) on clips already on the device, fp32 vs
    bf16 autocast: clips/s, busy % and peak memory (random seeded weights: speed only)."""
    model, transform, _ = create_model(s.embed_model, pretrained=None, seed=0)
    model = model.to(s.device).eval()
    cfg = SamplingConfig.from_dict(dict(s.sampling))
    n, t = (1, cfg.max_frames) if cfg.mode == "clip4clip" else cfg.shape
    size = transform.image_size
    frames = np.random.default_rng(0).integers(0, 256, (s.embed_batch, n, t, size, size, 3), dtype=np.uint8)
    x = transform(frames).to(s.device)
    mask = torch.ones((s.embed_batch, n, t), dtype=torch.bool, device=s.device)
    base = None
    for arm, amp in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        if not budget.allows(arm):
            return

        def forward(amp=amp):
            with torch.inference_mode(), torch.autocast(torch.device(s.device).type, dtype=amp,
                                                        enabled=amp is not None):
                return model.video_from_clips(model.encode_clips(x, mask), mask)

        reset_peak(s.device)
        with BusySampler(s.device) as busy:
            iters, seconds = run_for(forward, s.arm_seconds, s.device)
        rate = iters * s.embed_batch * n / seconds
        base = base or rate
        out.add("embed", {"model": s.embed_model, "arm": arm, "clips_per_s": rate, "vs_fp32": rate / base,
                          "busy_pct": busy.busy_mean(), "peak_mem_mb": peak_memory_mb(s.device),
                          "batch": f"{s.embed_batch} x {n} x {t} frames"})


def _embed_sequential(stage: EncodeClipsStage, samples: list, cfg: SamplingConfig) -> None:
    """The baseline the pipeline must beat: for each video, decode its sampled frames, then encode them."""
    for _key, mp4, meta in samples:
        clip = sample_clips(mp4, cfg, size=stage.transform.image_size, meta=meta)
        stage.embed(clip.frames[None], clip.mask[None])


def _embed_predecoded(stage: EncodeClipsStage, decoded: list, batch: int) -> None:
    """The encoder alone (what the pipeline's encoder actor does per batch) over pre-decoded batches."""
    for i in range(0, len(decoded), batch):
        part = decoded[i:i + batch]
        stage.embed(np.stack([f for f, _ in part]), np.stack([m for _, m in part]))


def _timed_path(out: SectionOut, name: str, videos: int, device: str, fn: Callable[[], Any]) -> float:
    with BusySampler(device) as busy:
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - t0
    rate = videos / seconds
    out.add("pipeline_paths", {"path": name, "videos_per_s": rate, "busy_pct": busy.busy_mean()})
    return rate


def section_pipeline(s: Settings, budget: Budget, out: SectionOut) -> None:
    """``workflows.embed.run_embed`` (the Ray Data pipeline: decode actors on CPUs, the encoder actor on the
    GPU) vs the sequential decode-then-encode loop and the encoder alone on pre-decoded batches."""
    connect_ray(num_cpus=s.ray_cpus)
    duration, px, fps = s.pipeline_video
    ingest = make_embed_corpus(s.workdir / "pipeline", s.pipeline_videos, duration, px, fps, 1.0)
    samples = list(iter_samples(ingest))
    cfg = SamplingConfig.from_dict(dict(s.sampling))
    stage = EncodeClipsStage(s.embed_model, device=s.device, threads=s.cores, allow_random_init=True)
    stage.embed(*(a[None] for a in _decode_one(samples[0], cfg, stage)))  # warm-up (cuDNN, allocator)
    sequential = "sequential (decode then encode, one video at a time)"
    rates = {sequential: _timed_path(out, sequential, len(samples), s.device,
                                     partial(_embed_sequential, stage, samples, cfg))}
    if not budget.allows("the pre-decoded encoder loop"):
        return
    decoded = [_decode_one(sample, cfg, stage) for sample in samples]
    rates["encoder alone on pre-decoded batches"] = _timed_path(
        out, "encoder alone on pre-decoded batches", len(samples), s.device,
        partial(_embed_predecoded, stage, decoded, s.embed_batch))
    del stage, decoded
    if s.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the encoder actor loads its own copy
    if not budget.allows("the Ray Data pipeline"):
        return
    with BusySampler(s.device) as busy:
        t0 = time.perf_counter()
        output = tempfile.mkdtemp(prefix="emb-", dir=s.workdir / "pipeline")  # fresh: the run is incremental
        summary = run_embed(str(ingest), s.embed_model, output,
                            sampling=s.sampling, batch_size=s.embed_batch, encoders=1, decoders=s.decoders,
                            progress_every=10, allow_random_init=True)
        wall = time.perf_counter() - t0
    if summary["videos"] != len(samples) or summary["errors"]:
        raise RuntimeError(f"pipeline embedded {summary['videos']} of {len(samples)} videos, "
                           f"{summary['errors']} errors")
    steady_from = wall - (summary["seconds"] - summary["startup_s"])  # the sampler clock at the first output
    record_pipeline(out, rates, len(samples) / wall, summary, busy.busy_mean(), busy.busy_mean(steady_from))


def _decode_one(sample: tuple, cfg: SamplingConfig, stage: EncodeClipsStage) -> tuple[np.ndarray, np.ndarray]:
    _key, mp4, meta = sample
    clip = sample_clips(mp4, cfg, size=stage.transform.image_size, meta=meta)
    return clip.frames, clip.mask


def record_pipeline(out: SectionOut, rates: dict[str, float], wall_rate: float, summary: dict[str, Any],
                    busy_all: float, busy_steady: float) -> None:
    out.add("pipeline_paths", {"path": "pipeline (workflows.embed), wall", "videos_per_s": wall_rate,
                               "busy_pct": busy_all})
    out.add("pipeline_paths", {"path": "pipeline, after its first output (steady)",
                               "videos_per_s": summary["steady_videos_per_s"], "busy_pct": busy_steady})
    seq = rates["sequential (decode then encode, one video at a time)"]
    alone = rates.get("encoder alone on pre-decoded batches")
    out.add("pipeline_floors", {"floor": f"pipeline >= {PIPELINE_FLOOR}x the sequential loop (wall)",
                                "measured": f"{wall_rate / seq:.2f}x",
                                "met": _met(wall_rate / seq >= PIPELINE_FLOOR)})
    out.add("pipeline_floors", {"floor": f"GPU busy >= {BUSY_FLOOR:.0f} % during the pipeline (after its "
                                         "first output)", "measured": f"{busy_steady:.0f} %",
                                "met": _met(busy_steady >= BUSY_FLOOR)})
    if alone:
        out.add("pipeline_floors", {"floor": f"pipeline >= {MODEL_ONLY_FLOOR}x the encoder alone (wall)",
                                    "measured": f"{wall_rate / alone:.2f}x",
                                    "met": _met(wall_rate / alone >= MODEL_ONLY_FLOOR)})
    out.notes.append(f"pipeline start-up {summary['startup_s']:.1f} s of {summary['seconds']:.1f} s")


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def section_train(s: Settings, budget: Budget, out: SectionOut) -> None:
    """One optimizer step of the training loop (``train_step``: autocast forward, backward, clipping, AdamW,
    schedule) in fp32 vs bf16 autocast, per model; random init (step time only, clearly not trained)."""
    device = torch.device(s.device)
    for model_name, batch_size, frames in s.train_models:
        if not budget.allows(model_name):
            return
        cfg = TrainConfig(model=model_name, batch_size=batch_size, epochs=1, amp="off",
                          cpus_per_worker=s.cores,
                          train_sampling={"num_clips": 1, "frames_per_clip": frames, "mode": "train"})
        loop = {"config": dataclasses.asdict(cfg), "inventory": {}, "steps_per_epoch": 10_000}
        state = setup_worker(loop, rank=0, world=1, device=device)
        state.objective.to(device)  # what ray.train.torch.prepare_model does on a worker
        size = state.model.image_size
        rng = np.random.default_rng(0)
        samples = [{"frames": rng.integers(0, 256, (1, frames, size, size, 3), dtype=np.uint8),
                    "mask": np.ones((1, frames), bool), "captions": [f"a shape number {i} moves left"],
                    "video_id": str(i)} for i in range(batch_size)]
        batch = collate(samples, state.transform)
        base = None
        for arm, amp in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
            if not budget.allows(f"{model_name} {arm}"):
                return
            state.autocast = amp
            reset_peak(s.device)
            iters, seconds = run_for(partial(train_step, state, batch), s.arm_seconds, s.device)
            step_ms = 1000.0 * seconds / iters
            base = base or step_ms
            out.add("train", {"model": model_name, "arm": arm, "step_ms": step_ms, "speedup": base / step_ms,
                              "peak_mem_mb": peak_memory_mb(s.device),
                              "batch": f"{batch_size} videos x {frames} frames", "weights": "random init"})
        del state, batch


def make_vectors(n: int, dim: int, seed: int, chunk: int = 1_000_000) -> np.ndarray:
    """``n`` unit vectors from a Gaussian mixture (:class:`bench.index.Mixture`), generated in chunks."""
    mix = Mixture(dim, clusters=256, seed=0)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):
        out[i:i + chunk] = mix.sample(min(chunk, n - i), seed=seed + i)
    return out


def faiss_arm(factory: str, xb: np.ndarray, xq: np.ndarray, nprobe: int, device: str, threads: int) -> dict:
    """Train + add + search one ``factory`` index on ``device`` ("cpu": ``threads`` OpenMP threads)."""
    import faiss

    set_faiss_threads(threads)
    index = make_index(factory, xb.shape[1])
    train_n = training_size(index, len(xb))
    resources = None
    if device.startswith("cuda"):
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, torch.device(device).index or 0, index)
    times = {}
    t0 = time.perf_counter()
    index.train(xb[:train_n])
    times["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.add(xb)
    times["add_s"] = time.perf_counter() - t0
    space = faiss.GpuParameterSpace() if resources is not None else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", nprobe)
    t0 = time.perf_counter()
    _, found = index.search(xq, 10)
    times["search_s"] = time.perf_counter() - t0
    return {**times, "train_n": train_n, "found": found}


def faiss_size(s: Settings, budget: Budget) -> int:
    """``--faiss-n``, else the largest of ``faiss_sizes`` whose CPU build (extrapolated from a calibration
    build of ``faiss_calibration_n`` vectors, plus vector generation) and a GPU build no slower fit 70 % of
    the time left."""
    if s.faiss_n:
        return s.faiss_n
    n0 = s.faiss_calibration_n
    t0 = time.perf_counter()
    xb = make_vectors(n0, s.faiss_dim, seed=1)
    gen_rate = n0 / (time.perf_counter() - t0)
    cal = faiss_arm(s.faiss_factory, xb, xb[:100], s.faiss_nprobe, "cpu", s.cores)
    per_vector = 1.0 / gen_rate + 2.0 * cal["add_s"] / n0
    index = make_index(s.faiss_factory, s.faiss_dim)
    train_s_per_vector = cal["train_s"] / cal["train_n"]  # training time grows with its sample (k-means)

    def estimate(n: int) -> float:
        return 2.0 * train_s_per_vector * training_size(index, n) + n * per_vector

    fits = [n for n in s.faiss_sizes if estimate(n) <= 0.7 * budget.left()]
    print(f"[bench.gpu]   FAISS size: {fits[0] if fits else s.faiss_sizes[-1]:,} vectors (calibration: "
          f"train {cal['train_s']:.1f} s, add {n0 / cal['add_s']:,.0f} vectors/s on CPU)", flush=True)
    return fits[0] if fits else s.faiss_sizes[-1]


def section_faiss(s: Settings, budget: Budget, out: SectionOut) -> None:
    """IVF-PQ build + search on the device vs the CPU with every core, recall@10 against exact search."""
    import faiss

    n = faiss_size(s, budget)
    if not budget.allows(f"generating {n:,} vectors"):
        return
    xb = make_vectors(n, s.faiss_dim, seed=7)
    xq = make_vectors(s.faiss_queries, s.faiss_dim, seed=10**9)
    truth_q = min(100, len(xq))
    _, truth = faiss.knn(xq[:truth_q], xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    # The device arm first: when the CPU build overruns the budget, the figure the section exists for is in.
    arms = [(f"{s.device}" if s.device != "cpu" else "device arm (cpu in dry run)", s.device),
            (f"cpu, {s.cores} threads", "cpu")]
    results = {}
    for name, device in arms:
        if not budget.allows(f"the {name} build"):
            break
        results[name] = faiss_arm(s.faiss_factory, xb, xq, s.faiss_nprobe, device, s.cores)
    cpu = results.get(arms[1][0])
    for name, r in results.items():
        build = r["train_s"] + r["add_s"]
        out.add("faiss", {"arm": name, "vectors": f"{n:,} x {s.faiss_dim}", "factory": s.faiss_factory,
                          "train_s": r["train_s"], "add_s": r["add_s"],
                          "build_speedup": (cpu["train_s"] + cpu["add_s"]) / build if cpu else None,
                          "search_qps": len(xq) / r["search_s"],
                          "search_speedup": cpu["search_s"] / r["search_s"] if cpu else None,
                          "recall_at_10": recall_at_k(r["found"][:truth_q], truth, 10),
                          "nprobe": s.faiss_nprobe})


class DecodeWorker:
    """A decode worker for the scaling runs: every frame of each video, one FFmpeg thread (workers scale)."""

    def __init__(self):
        self.backend = TorchCodecBackend("cpu", num_threads=1)

    def warm(self, path: str) -> int:
        """Decode one frame (imports torchcodec, loads FFmpeg): start-up stays out of the timed run."""
        self.backend.decode_times(path, np.zeros(1), None)
        return os.getpid()

    def decode(self, paths: list[str]) -> int:
        frames = 0
        for path in paths:
            meta = probe_video(path)
            frames += len(self.backend.decode_times(path, meta.frame_times, meta).frames)
        return frames


def decode_with_workers(paths: list[str], workers: int) -> tuple[int, float]:
    """(frames, seconds) of ``workers`` warm Ray actors decoding ``paths`` (round-robin shares)."""
    actors = [ray.remote(num_cpus=1)(DecodeWorker).remote() for _ in range(workers)]
    try:
        ray.get([a.warm.remote(paths[0]) for a in actors])  # start-up is not timed
        t0 = time.perf_counter()
        frames = sum(ray.get([a.decode.remote(paths[i::workers]) for i, a in enumerate(actors)]))
        return frames, time.perf_counter() - t0
    finally:
        for actor in actors:
            ray.kill(actor)


def section_scaling(s: Settings, budget: Budget, out: SectionOut) -> None:
    """Ingest (transcode to 224 px) and decode with 1, 4, 8 and 16 workers (1 first: it is the baseline)."""
    width, height, seconds = s.scaling_video
    # a process pool (fork) makes the corpus: before Ray starts in this process
    manifest = make_ingest_corpus(s.workdir, "scaling", s.scaling_videos, width, height, seconds, 25, 0.2,
                                  s.ray_cpus)
    startup = start_ray(s.ray_cpus)  # ray.init + every task worker started and warm (ingest's imports)
    out.notes.append(f"ray.init {startup['ray_init_s']:.1f} s, {startup['workers']} task workers warmed")
    paths = sorted(str(p) for p in (manifest.parent / "videos").glob("*.mp4"))
    spp = max(1, len(paths) // (4 * max(s.workers)))  # >= 4 shards per worker: none idles on the last one
    order = [1, *sorted((w for w in s.workers if w != 1), reverse=True)]
    base: dict[str, float] = {}
    for workers in order:
        for stage in ("ingest (transcode)", "decode"):
            if not budget.allows(f"{stage} with {workers} workers"):
                return
            if stage == "decode":
                frames, took = decode_with_workers(paths, workers)
                rate, unit = frames / took, "frames/s"
            else:
                took = time_ray(manifest, s.workdir / "scaling-out", spp, workers,
                                {"short_side": 224, "keyframe_interval": 1.0})
                rate, unit = len(paths) / took, "videos/s"
            base.setdefault(stage, rate)
            out.add("scaling", {"stage": stage, "workers": workers, "rate": rate, "unit": unit,
                                "speedup": rate / base[stage], "efficiency": rate / base[stage] / workers})


SECTION_FUNCTIONS = {"decode": section_decode, "embed": section_embed, "pipeline": section_pipeline,
                     "train": section_train, "faiss": section_faiss, "scaling": section_scaling}


# --------------------------------------------------------------------------------------------- record

TABLES = {
    "decode": [col("video", "video"), col("arm", "decoder"), col("frames_per_s", "frames/s", "{:,.0f}"),
               col("vs_cpu", "÷ CPU", "{:.2f}x"),
               col("mean_abs_diff", "mean |Δ| vs CPU (grey levels)", "{:.2f}")],
    "embed": [col("model", "model"), col("arm", "precision"), col("batch", "batch"),
              col("clips_per_s", "clips/s", "{:,.0f}"), col("vs_fp32", "÷ fp32", "{:.2f}x"),
              col("busy_pct", "busy %", "{:.0f}"), col("peak_mem_mb", "peak memory (MB)", "{:,.0f}")],
    "pipeline_paths": [col("path", "path"), col("videos_per_s", "videos/s", "{:.2f}"),
                       col("busy_pct", "busy %", "{:.0f}")],
    "pipeline_floors": [col("floor", "floor"), col("measured", "measured"), col("met", "met")],
    "train": [col("model", "model"), col("weights", "weights"), col("batch", "batch"),
              col("arm", "precision"),
              col("step_ms", "step (ms)", "{:.1f}"), col("speedup", "fp32 ÷ this", "{:.2f}x"),
              col("peak_mem_mb", "peak memory (MB)", "{:,.0f}")],
    "faiss": [col("arm", "arm"), col("vectors", "vectors"), col("factory", "factory"),
              col("train_s", "train (s)", "{:.2f}"), col("add_s", "add (s)", "{:.2f}"),
              col("build_speedup", "build ÷ CPU", "{:.2f}x"),
              col("search_qps", "search queries/s", "{:,.0f}"),
              col("search_speedup", "search ÷ CPU", "{:.2f}x"), col("recall_at_10", "recall@10", "{:.3f}")],
    "scaling": [col("stage", "stage"), col("workers", "workers"), col("rate", "rate", "{:,.1f}"),
                col("unit", "unit"), col("speedup", "÷ 1 worker", "{:.2f}x"),
                col("efficiency", "efficiency", "{:.0%}")],
    "sections": [col("section", "section"), col("status", "status"), col("seconds", "seconds", "{:.1f}"),
                 col("budget_s", "budget (s)", "{:.0f}"), col("detail", "detail")],
}
BASELINES = {
    "decode": "the same frames decoded by CPU torchcodec with every core, same file, same run (median of "
              "interleaved repeats after one warm-up each)",
    "embed": "the fp32 forward on the same device-resident batch, same run",
    "pipeline_paths": "the sequential decode-then-encode loop and the encoder alone on pre-decoded batches, "
                      "same videos, weights (random, seeded) and sampling, same run",
    "pipeline_floors": "as in the pipeline paths table",
    "train": "the fp32 step of the same model and batch, same run",
    "faiss": "the same factory trained, filled and searched on the CPU with every core, same vectors; recall "
             "against exact inner-product search of the first 100 queries",
    "scaling": "the same stage with 1 worker, same files, same run",
    "sections": "each section's own time budget",
}


def device_info(settings: Settings) -> dict[str, Any]:
    info: dict[str, Any] = {"dry_run": settings.dry_run, "device": settings.device,
                            "torch": torch.__version__, "cuda": torch.version.cuda, "cores": settings.cores}
    if settings.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def write_record(record: BenchRecord, settings: Settings, outs: dict[str, SectionOut],
                 statuses: list[dict[str, Any]], args: argparse.Namespace) -> None:
    sample = "dry run: toy sizes on CPU, figures mean nothing" if settings.dry_run else (
        f"one run on {device_info(settings).get('gpu', settings.device)}, {settings.cores} CPU cores")
    merged: dict[str, list[dict[str, Any]]] = {}
    for out in outs.values():
        for name, rows in out.tables.items():
            merged.setdefault(name, []).extend(rows)
    merged["sections"] = statuses
    for name, rows in merged.items():
        record.table(name, columns=TABLES[name], rows=rows, sample_size=sample, baseline=BASELINES[name])
        print(f"\n{name}\n" + " | ".join(c["label"] for c in TABLES[name]))
        for row in rows:
            print(" | ".join(format_cell(row.get(c["key"]), c["fmt"]) for c in TABLES[name]))
    for row in merged.get("pipeline_floors", []):
        record.add_headline("GPU embed pipeline" + (" (dry run)" if settings.dry_run else ""), row["floor"],
                            row["measured"], row["met"])
    record.extra.update(device_info(settings))
    record.write(args.json, note=args.note)


# ------------------------------------------------------------------------------------------------ main


def parse_budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in SECTIONS or not seconds:
        raise argparse.ArgumentTypeError(f"--budget {text!r}: expected NAME=SECONDS, NAME one of {SECTIONS}")
    return name, float(seconds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every section at toy size on CPU (no GPU needed)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--budget", type=parse_budget, action="append", default=[],
                   help=f"NAME=SECONDS, repeatable (defaults: {REAL_BUDGETS})")
    p.add_argument("--model", default="clip4clip-meanP-ViT-B-32", help="the base model (random init)")
    p.add_argument("--pipeline-videos", type=int, default=512, help="videos of the pipeline section's corpus")
    p.add_argument("--faiss-n", type=int, default=None,
                   help="vectors of the FAISS section (default: the largest of 10M, 5M, ... that fits its "
                        "budget)")
    p.add_argument("--faiss-factory", default="IVF4096,PQ32")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temp folder)")
    add_record_args(p, "gpu")
    p.add_argument("--out", dest="json", type=Path, default=argparse.SUPPRESS, help="same as --json")
    args = p.parse_args(argv)
    args.budget = dict(args.budget)
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; expected a subset of {SECTIONS}")
    if args.dry_run and args.json == default_json("gpu"):
        args.json = Path(tempfile.gettempdir()) / "vidsift-bench-gpu-dry-run.json"  # never the docs' figures
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    record = BenchRecord.start("gpu", sys.argv[1:] if argv is None else argv)
    settings = settings_for(args)
    print(f"[bench.gpu] {'DRY RUN (CPU, toy sizes)' if settings.dry_run else 'GPU run'}: sections "
          f"{args.sections}, workdir {settings.workdir}, info {device_info(settings)}", flush=True)
    progress = Progress("bench.gpu", len(args.sections), unit="sections", every_s=0)
    outs: dict[str, SectionOut] = {}
    statuses = []
    for name in args.sections:
        outs[name] = SectionOut()
        statuses.append(run_section(name, SECTION_FUNCTIONS[name], settings, outs[name]))
        progress.update(1, f"{name} {statuses[-1]['status']}")
    write_record(record, settings, outs, statuses, args)
    if args.workdir is None:  # a temp folder of this run's own (videos, shards, embeddings)
        shutil.rmtree(settings.workdir, ignore_errors=True)
    failed = [s["section"] for s in statuses if s["status"] == "error"]
    print(f"[bench.gpu] done in {time.perf_counter() - record.t0:.0f} s; "
          f"{'failed sections: ' + ', '.join(failed) if failed else 'no section failed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
