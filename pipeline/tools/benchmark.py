"""Benchmarks behind the defaults: prints figures as ratios against a baseline measured in the same run.

    python -m pipeline.tools.benchmark            # all
    python -m pipeline.tools.benchmark --only model

model: small_alexnet inference and training throughput, fp32 (baseline) vs channels_last vs bf16
       autocast; why `amp: auto` keeps fp32 on the CPU.
pca:   our covariance + scipy partial eigh (stages.pca) vs faiss.PCAMatrix(d, dim, -0.5).
kmeans: faiss k-means on all points (what stages.cluster does) vs faiss's default subsampling.
pic:   PIC (exact and ivf graphs) vs k-means (baseline) on the same synthetic 256-d features at 100k and 1M
       points: seconds and peak memory, each method in its own process (peak memory is per process).
       `--sizes 100000` for the 100k row alone.
ddp:   the train stage's epoch loop (train_one_epoch) on the default small_alexnet and batch: 1 process
       with 2 torch threads (baseline) vs 2 gloo DDP processes with 1 thread each (the same 2 cores), with
       and without train.sync_batchnorm; scaling efficiency = throughput ratio / 2.
memory: peak resident memory of the pca and cluster stages (their run_* functions, as the flow calls them) on
       1M x 256 float32 features in a features.npy file, each in its own process, as multiples of the
       feature matrix's size (1 GB): they must stay O(N x 256), a small multiple of it. The baseline is the
       same process with nothing run (imports only); "features in RAM" is np.load of the whole file.
images: an image tree of synthetic ImageNet-like JPEGs (375-500 px sides, smoothed noise, quality 90; 2,000 or
       `--images 20000`): prepare's images/s (header checks vs decoding every file, the old check, as the
       baseline), and extract's and train's images/s through stages.core.data's loaders vs a plain torchvision
       ImageFolder + DataLoader (the baseline) at the same worker count (`--workers`, default auto: the
       usable cores), the loaders alone and with AlexNet at 224 px (channels_last) on the device; on a
       GPU also the loaders with decode: gpu (nvJPEG).
tracking: the cost of what runs beside training: small_alexnet training steps alone (baseline) vs inside an
       MLflow run with system metrics sampled every 10 s (the flow's setting) and every 1 s (ten times as
       often, to make a cost visible), alternated, best of 5; and the epoch line's clock (RunClock + epoch_line).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import torch

from stages.core.clustering import run_kmeans, run_pic
from stages.core.models import build_model
from stages.core.runtime import peak_rss_mb
from stages.core.whitening import fit_pca_whitening


def _best_of(fn, repeats: int = 3) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_model(batch: int = 256, width: int = 32) -> None:
    torch.manual_seed(0)
    x0 = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 100, (batch,))
    rows = []
    for name, cl, amp in (("fp32", False, False), ("fp32 channels_last", True, False), ("bf16 autocast + channels_last", True, True)):
        model = build_model({"arch": "small_alexnet", "sobel": True, "width": width, "fc_dim": 256}, 1, 28)
        model.reset_top_layer(100)
        x = x0.contiguous(memory_format=torch.channels_last) if cl else x0
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext

        def infer():
            model.eval()
            with torch.no_grad(), ctx():
                model.fc_features(x)

        def train_step():
            model.train()
            with ctx():
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        rows.append((name, batch / _best_of(infer), batch / _best_of(train_step)))
    base_inf, base_tr = rows[0][1], rows[0][2]
    print(f"model: small_alexnet width {width}, batch {batch}, 28 px, {torch.get_num_threads()} threads")
    for name, inf, tr in rows:
        print(f"  {name:32s} inference {inf:7.0f} img/s ({inf / base_inf:4.2f}x)   training {tr:6.0f} img/s ({tr / base_tr:4.2f}x)")


def bench_pca(n: int = 20000, d: int = 1024, dim: int = 128) -> None:
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32) @ np.random.default_rng(1).standard_normal((d, d)).astype(np.float32)
    t_faiss = _best_of(lambda: faiss.PCAMatrix(d, dim, -0.5).train(x), 1)
    t_ours = _best_of(lambda: fit_pca_whitening(x, dim), 1)
    print(f"pca: {n} x {d} -> {dim}: faiss.PCAMatrix {t_faiss:.2f}s (baseline), stages.pca {t_ours:.2f}s ({t_faiss / t_ours:.2f}x faster)")


def bench_kmeans(n: int = 50000, d: int = 64, k: int = 500) -> None:
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    t_sub = _best_of(lambda: faiss.Kmeans(d, k, niter=20, seed=1).train(x), 1)  # at most 256 points per centroid
    t_all = _best_of(lambda: run_kmeans(x, k, 20, seed=1), 1)
    print(f"kmeans: {n} x {d}, k={k}: faiss default subsampling {t_sub:.2f}s (baseline, trains on "
          f"{min(n, 256 * k)} points), all points {t_all:.2f}s ({t_all / t_sub:.2f}x the time)")


def _spawned(target, *arg_lists: tuple) -> list:
    """target(*args, results) in a fresh spawned process per args, all at once; what each put in `results`.
    A fresh process's peak memory is its own work's alone."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, results)) for args in arg_lists]
    for proc in procs:
        proc.start()
    outs = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return outs


def synthetic_features(n: int, d: int, centres: int = 1000, seed: int = 0) -> np.ndarray:
    """n L2-normalised points around `centres` random centres (as the pca stage hands them over), in chunks
    so that only the result is n x d."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centres, d), dtype=np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        chunk = mu[rng.integers(0, centres, stop - start)] + rng.standard_normal((stop - start, d), dtype=np.float32)
        x[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return x


def _clustering_worker(method: str, n: int, d: int, k: int, results) -> None:
    x = synthetic_features(n, d)
    data_mb = peak_rss_mb()
    t = time.perf_counter()
    if method == "kmeans":
        c = run_kmeans(x, k, 20, seed=1, device="cpu")
    else:
        c = run_pic(x, device="cpu", graph=method.split()[1])
    results.put({"seconds": time.perf_counter() - t, "peak_mb": peak_rss_mb(), "data_mb": data_mb, "clusters": c.k})


def bench_pic(sizes: tuple[int, ...] = (100_000, 1_000_000), d: int = 256, k: int = 1000) -> None:
    print(f"pic: PIC (5-NN graph, 200 power iterations) vs k-means (k = {k}, 20 iterations, the baseline) on "
          f"synthetic {d}-d features, CPU, {faiss.omp_get_max_threads()} faiss threads")
    for n in sizes:
        # the exact graph is O(N^2 d): at 1M points about 100 times its 100k time, hours on a small CPU
        methods = ("kmeans", "pic exact", "pic ivf") if n <= 200_000 else ("kmeans", "pic ivf")
        rows = {method: _spawned(_clustering_worker, (method, n, d, k))[0] for method in methods}  # one process each
        base = rows["kmeans"]
        for method, r in rows.items():
            print(f"  N={n:>9,}  {method:10s} {r['seconds']:8.1f}s ({r['seconds'] / base['seconds']:5.2f}x)   peak "
                  f"{r['peak_mb']:7.0f} MB ({r['peak_mb'] / base['peak_mb']:4.2f}x; {r['data_mb']:.0f} MB before clustering)"
                  f"   {r['clusters']} clusters")


def _ddp_worker(rank: int, size: int, threads: int, port: int, sync_bn: bool, steps: int, results) -> None:
    from stages.core.data import ImageSet
    from stages.core.distributed import World, global_batchnorm, split_sample
    from stages.core.params import load_params
    from stages.train import body_optimizer, head_optimizer, train_one_epoch

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if size > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    p = params.train
    batch = p.batch_size
    rng = np.random.default_rng(0)
    n = (steps + 5) * batch
    images = ImageSet(Path("."), {"mean": [0.29], "std": [0.35]}, np.arange(n).astype(str), np.zeros(n, np.int64),
                      rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), None)  # random pixels: speed only
    torch.manual_seed(0)
    model = build_model(params.model.model_dump(), 1, 28)
    if size > 1 and sync_bn:
        model = global_batchnorm(model, torch.device("cpu"))
    optimizer = body_optimizer(model, p, p.lr)
    model.reset_top_layer(312)  # the default run's clusters (20k images / 64)
    top_optimizer = head_optimizer(model, p, p.lr)
    model = model.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model) if size > 1 else model
    world = World(rank=rank, size=size, local_rank=rank, local_size=size)
    share = p.model_copy(update={"batch_size": batch // size})
    targets = rng.integers(0, 312, n)
    gen = torch.Generator().manual_seed(rank)
    warm, timed = np.arange(5 * batch), np.arange(5 * batch, n)
    seconds = []
    for rows in (warm, timed, timed, timed):  # a warm-up, then 3 timed passes
        mine = split_sample(rows, batch, world)
        if size > 1:
            torch.distributed.barrier()
        t = time.perf_counter()
        train_one_epoch(net, images, mine, targets[mine], optimizer, top_optimizer, share, torch.device("cpu"), gen,
                        progress=False)
        seconds.append(time.perf_counter() - t)
    results.put((seconds[1:], len(timed)))
    if size > 1:
        torch.distributed.destroy_process_group()


def bench_ddp(steps: int = 60) -> None:
    rows = []
    for name, size, threads, sync_bn in (("1 process x 2 threads", 1, 2, False),
                                         ("2 processes x 1 thread, sync_batchnorm", 2, 1, True),
                                         ("2 processes x 1 thread, per-process BN", 2, 1, False)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        outs = _spawned(_ddp_worker, *((r, size, threads, port, sync_bn, steps) for r in range(size)))
        # a pass is done when its slowest rank is; the best of the 3 passes (other jobs only slow one down)
        best = min(max(per_rank) for per_rank in zip(*(seconds for seconds, _ in outs)))
        rows.append((name, size, outs[0][1] / best))
    base = rows[0][2]
    print(f"ddp: train_one_epoch, small_alexnet (params.yaml's model), global batch = train.batch_size, best of 3 "
          f"passes of {steps} steps on random 28 px images, gloo on {len(os.sched_getaffinity(0))} CPU(s)")
    for name, size, rate in rows:
        ratio = rate / base
        print(f"  {name:40s} {rate:6.0f} img/s ({ratio:4.2f}x, scaling efficiency {ratio / size:4.2f})")


def _anon_peak_sampler(interval: float = 0.005):
    """Start a thread that samples RssAnon (heap and other private memory, not the file pages of memmaps, which
    peak RSS counts too and the kernel can drop) from /proc/self/status; returns a function giving its peak MB."""
    peak = [0.0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], _status_mb("RssAnon"))
            time.sleep(interval)

    threading.Thread(target=sample, daemon=True).start()
    return lambda: peak[0]


def _memory_worker(step: str, features: str, out: str, overrides: dict, results) -> None:
    from stages.cluster import run_cluster
    from stages.core.layout import PCA_FEATURES
    from stages.core.params import load_params
    from stages.pca import run_pca

    anon_peak = _anon_peak_sampler()
    params = load_params("params.yaml", overrides)
    t = time.perf_counter()
    if step == "features in RAM":
        float(np.load(features).sum())
    if step in ("pca", "pca + cluster"):
        run_pca(params, features, out, epoch=1)
    if step in ("cluster", "pca + cluster"):
        run_cluster(params, Path(out) / PCA_FEATURES, out, epoch=1)
    time.sleep(0.02)  # one more sample
    results.put({"seconds": time.perf_counter() - t, "peak_mb": _status_mb("VmHWM"), "anon_mb": anon_peak()})


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB. VmHWM is the peak RSS of this process's
    own memory map: unlike getrusage's ru_maxrss, a spawned child does not inherit its parent's peak (the
    kernel carries ru_maxrss across fork and exec, so a child spawned by a 2 GB parent would report 2 GB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def bench_memory(n: int = 1_000_000, d: int = 256, k: int = 1000, niter: int = 5) -> None:
    overrides = {"pca.dim": d, "cluster.k": k, "cluster.niter": niter, "cluster.device": "cpu"}
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        features = Path(tmp) / "features.npy"
        x = np.lib.format.open_memmap(features, mode="w+", dtype=np.float32, shape=(n, d))
        for start in range(0, n, 100_000):
            x[start:start + 100_000] = synthetic_features(min(100_000, n - start), d, seed=start)
        x.flush()
        del x
        size_mb = n * d * 4 / 2**20
        print(f"memory: pca (256 -> {d}, fitted on {100_000:,} rows) and cluster (faiss k-means, k = {k}, {niter} "
              f"iterations, CPU) on {n:,} x {d} float32 features ({size_mb:,.0f} MB) in a .npy file, each step in its own "
              "process: peak RSS (VmHWM; the file pages of memmaps count in it) and peak private memory (RssAnon)")
        rows = {step: _spawned(_memory_worker, (step, str(features), tmp, overrides))[0]  # one process each
                for step in ("baseline", "features in RAM", "pca", "cluster", "pca + cluster")}
        base, base_anon = rows["baseline"]["peak_mb"], rows["baseline"]["anon_mb"]
        for step, r in rows.items():
            print(f"  {step:16s} {r['seconds']:6.1f}s   peak RSS {r['peak_mb']:5.0f} MB = {r['peak_mb'] / size_mb:4.2f}x the "
                  f"features ({(r['peak_mb'] - base) / size_mb:4.2f}x above the baseline)   private (RssAnon) peak "
                  f"{r['anon_mb']:5.0f} MB = {(r['anon_mb'] - base_anon) / size_mb:4.2f}x the features above the baseline")


def synthetic_jpegs(root: Path, n: int, classes: int = 10, seed: int = 0) -> list[Path]:
    """n JPEGs (quality 90) in `classes` class folders, sides 375-500 px as most ImageNet photographs, of
    smoothed colour noise at two scales: JPEG-compressible like a photograph (tens of kB), unlike white noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(375, 501, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        fine = Image.fromarray(rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        path = root / f"class{i % classes:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.blend(coarse, fine, 0.3).save(path, quality=90)
        paths.append(path)
    return paths


def _decodes(path: str) -> None:
    from PIL import Image

    with Image.open(path) as im:
        im.load()


def _images_per_second(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def bench_images(n: int = 2000, workers: int | str = "auto", batch: int = 256, model_images: int | None = None) -> None:
    """model_images: the images the rows with the network pass (default: all on a GPU; 256 on a CPU, where
    AlexNet's few images/s, not the loaders, set the pace and the whole tree would take an hour)."""
    import torchvision
    from torchvision import transforms as T

    from stages.core.data import extract_batches, load_split, loader_workers, train_batches
    from stages.core.schema import Prepare, Train
    from stages.extract import extract_features
    from stages.prepare import drop_unreadable, prepare, scan_image_tree
    from stages.train import body_optimizer, head_optimizer, train_one_epoch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tree, dataset = Path(tmp) / "tree", Path(tmp) / "dataset"
        paths = synthetic_jpegs(tree, n)
        threads = 8  # prepare.num_workers' default
        with ThreadPoolExecutor(threads) as pool:
            full = _images_per_second(n, lambda: list(pool.map(_decodes, map(str, paths))))
        manifest, _, _ = scan_image_tree(tree, labelled=True)
        header = _images_per_second(n, lambda: drop_unreadable(manifest, threads))
        section = Prepare(source="imagefolder", path=str(tree), max_train_images=None, max_test_images=None,
                          image_size=256, num_workers=threads)
        stage = _images_per_second(n, lambda: prepare("imagefolder", tree, dataset, section))
        images = load_split(dataset, "train")
        w = loader_workers(workers, images)
        mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"images: {n:,} synthetic JPEGs ({mb / n * 1024:.0f} kB each), {w} workers, batch {batch}, AlexNet 224 px "
              f"channels_last on {device.type}, {torch.get_num_threads()} threads")
        print(f"  prepare: {threads} threads decoding every file {full:6.0f} img/s (baseline, the old check); "
              f"reading headers {header:6.0f} img/s ({header / full:.1f}x); the whole stage {stage:6.0f} img/s "
              f"({stage / full:.1f}x)")

        norm = T.Normalize(images.meta["mean"], images.meta["std"])
        views = {"extract": T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm]),
                 "train": T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                                     T.ToTensor(), norm])}

        def folder_loader(view: str, first: int = n):
            data = torchvision.datasets.ImageFolder(str(tree), transform=views[view])
            # the same files as stages' `few` (both sort the paths)
            data = torch.utils.data.Subset(data, range(first))
            return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=view == "train", num_workers=w,
                                               pin_memory=device.type == "cuda")

        torch.manual_seed(0)
        model = build_model({"arch": "alexnet", "sobel": True, "dropout": 0.5}, 3, 224).to(device)
        model.reset_top_layer(100)
        model = model.to(device, memory_format=torch.channels_last)
        p = Train(lr=0.01, lr_schedule="constant", momentum=0.9, weight_decay=1e-5, batch_size=batch, crop_size=224,
                  crop_scale=[0.08, 1.0], hflip=True, intensity_jitter=0.0, sync_batchnorm=False, amp="auto",
                  samples_per_epoch=None, min_samples_per_epoch=0, num_workers=w, decode="cpu", device="auto",
                  keep_checkpoint_every=0)
        opt, top = body_optimizer(model, p, p.lr), head_optimizer(model, p, p.lr)
        rows = np.random.default_rng(0).permutation(len(images))
        targets = np.random.default_rng(1).integers(0, 100, len(images))
        gen = torch.Generator().manual_seed(0)

        def baseline_extract():
            model.eval()
            with torch.no_grad(), (torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()):
                for x, _ in folder_loader("extract", m):
                    model.fc_features(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
            if device.type == "cuda":
                torch.cuda.synchronize()

        def baseline_train():
            model.train()
            for x, _ in folder_loader("train", m):
                y = torch.randint(0, 100, (len(x),), device=device)
                with torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext():
                    loss = torch.nn.functional.cross_entropy(
                        model(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)).float(), y)
                opt.zero_grad(set_to_none=True)
                top.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                top.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        m = model_images or (n if device.type == "cuda" else min(n, 256))
        few = dataclasses.replace(images, ids=images.ids[:m], labels=images.labels[:m], paths=images.paths[:m])
        few_rows = np.random.default_rng(0).permutation(m)
        out = np.empty((m, model.feature_dim), dtype=np.float32)
        rows_out = [
            ("extract", "loader only", lambda: sum(len(x) for x, _ in folder_loader("extract")),
             lambda: sum(len(x) for x in extract_batches(images, np.arange(len(images)), 224, batch, device, w))),
            ("extract", "+ AlexNet forward", baseline_extract,
             lambda: extract_features(model, few, out, crop_size=224, batch_size=batch, device=device,
                                      num_workers=w, progress=False)),
            ("train", "loader only", lambda: sum(len(x) for x, _ in folder_loader("train")),
             lambda: sum(len(x) for x in train_batches(images, rows, batch, crop_size=224, scale=(0.08, 1.0),
                                                       hflip=True, device=device, generator=gen, num_workers=w))),
            ("train", "+ AlexNet SGD step", baseline_train,
             lambda: train_one_epoch(model, few, few_rows, targets[few_rows], opt, top, p, device, gen, progress=False)),
        ]
        if device.type == "cuda":  # decode: gpu, JPEGs decoded by nvJPEG on the device
            rows_out[2:2] = [("extract", "loader, decode gpu", rows_out[0][2], lambda: sum(len(x) for x in extract_batches(
                images, np.arange(len(images)), 224, batch, device, w, decode="gpu")))]
            rows_out.append(("train", "loader, decode gpu", rows_out[-2][2], lambda: sum(len(x) for x in train_batches(
                images, rows, batch, crop_size=224, scale=(0.08, 1.0), hflip=True, device=device, generator=gen,
                num_workers=w, decode="gpu"))))
        # warm-up (allocator, oneDNN / cuDNN kernels), so that neither side pays for the first batch
        x = torch.randn(min(batch, 32), 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
        model.train()
        model(x).sum().backward()
        opt.zero_grad(set_to_none=True)
        top.zero_grad(set_to_none=True)
        for stage_name, what, baseline, ours in rows_out:
            k = m if "AlexNet" in what else n
            base, mine = _images_per_second(k, baseline), _images_per_second(k, ours)
            print(f"  {stage_name:7s} {what:18s} {k:6,} images  torchvision ImageFolder {base:6.0f} img/s (baseline)   stages.core.data "
                  f"{mine:6.0f} img/s ({mine / base:4.2f}x)")


def bench_tracking(seconds: float = 12.0, repeats: int = 5) -> None:
    import mlflow

    from pipeline.flow import RunClock, epoch_line
    from pipeline.tracking import start_run

    torch.manual_seed(0)
    model = build_model({"arch": "small_alexnet", "sobel": True, "width": 16, "fc_dim": 256}, 1, 28)
    model.reset_top_layer(312)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 312, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def steps_per_second() -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += 1
        return n / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        steps_per_second()  # warm-up
        rates: dict[str, list[float]] = {"alone": [], "system metrics every 10 s": [], "every 1 s": []}
        for _ in range(repeats):
            rates["alone"].append(steps_per_second())
            for name, interval in (("system metrics every 10 s", 10), ("every 1 s", 1)):
                mlflow.set_system_metrics_sampling_interval(interval)
                with start_run(run_name=name, system_metrics=True):
                    rates[name].append(steps_per_second())
        mlflow.set_system_metrics_sampling_interval(None)
    base = max(rates["alone"])
    print(f"tracking: small_alexnet training steps (batch 64, 28 px), {seconds:.0f} s each, best of {repeats}, "
          f"{torch.get_num_threads()} threads")
    for name, r in rates.items():
        print(f"  {name:28s} {max(r):7.1f} steps/s ({max(r) / base:5.3f}x)")
    clock = RunClock(500, [16.0] * 10)
    metrics = {"train_loss": 1.0, "nmi_previous": 0.5, "nmi_labels": 0.4, "n_clusters": 312, "empty_clusters": 0,
               "singleton_clusters": 0, "seconds_epoch": 16.0, "seconds_overhead": 0.2}
    per_call = _best_of(lambda: [(clock.add(16.0), epoch_line(metrics, 11, 500, clock)) for _ in range(1000)]) / 1000
    print(f"  the epoch line's clock: {per_call * 1e6:.0f} us per epoch ({per_call / 16.0:.1e} of a 16 s epoch)")


BENCHES = {"tracking": bench_tracking, "model": bench_model, "pca": bench_pca, "kmeans": bench_kmeans, "pic": bench_pic, "ddp": bench_ddp,
           "memory": bench_memory, "images": bench_images}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only these benchmarks")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="pic: numbers of points")
    parser.add_argument("--images", type=int, default=2000, help="images: JPEGs in the synthetic tree (20000: an "
                        "ImageNet-like minute per pass on a GPU machine)")
    parser.add_argument("--model-images", type=int, help="images: images the rows with AlexNet pass (default: all "
                        "on a GPU, 256 on a CPU)")
    parser.add_argument("--workers", default="auto", help="images: DataLoader workers on both sides (auto = the "
                        "usable cores, as num_workers: auto)")
    args = parser.parse_args(argv)
    for name in args.only or BENCHES:
        if name == "pic":
            bench_pic(tuple(args.sizes))
        elif name == "images":
            bench_images(args.images, args.workers if args.workers == "auto" else int(args.workers),
                         model_images=args.model_images)
        else:
            BENCHES[name]()


if __name__ == "__main__":
    main()
