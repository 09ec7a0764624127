"""Benchmarks behind the defaults: prints figures as ratios against a baseline measured in the same run.

    python -m pipeline.benchmark            # all
    python -m pipeline.benchmark --only model

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
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from stages.cluster import run_kmeans, run_pic
from stages.common import peak_rss_mb
from stages.models import build_model
from stages.pca import fit_pca_whitening


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

    def subsampled():
        km = faiss.Kmeans(d, k, niter=20, seed=1)  # faiss default: at most 256 points per centroid
        km.train(x)

    t_sub = _best_of(subsampled, 1)
    t_all = _best_of(lambda: run_kmeans(x, k, 20, seed=1), 1)
    print(f"kmeans: {n} x {d}, k={k}: faiss default subsampling {t_sub:.2f}s (baseline, trains on "
          f"{min(n, 256 * k)} points), all points {t_all:.2f}s ({t_all / t_sub:.2f}x the time)")


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
    ctx = multiprocessing.get_context("spawn")  # a fresh process each: its peak memory is the method's alone
    print(f"pic: PIC (5-NN graph, 200 power iterations) vs k-means (k = {k}, 20 iterations, the baseline) on "
          f"synthetic {d}-d features, CPU, {faiss.omp_get_max_threads()} faiss threads")
    for n in sizes:
        # the exact graph is O(N^2 d): at 1M points about 100 times its 100k time, hours on a small CPU
        methods = ("kmeans", "pic exact", "pic ivf") if n <= 200_000 else ("kmeans", "pic ivf")
        rows = {}
        for method in methods:
            results = ctx.Queue()
            proc = ctx.Process(target=_clustering_worker, args=(method, n, d, k, results))
            proc.start()
            rows[method] = results.get()
            proc.join()
        base = rows["kmeans"]
        for method, r in rows.items():
            print(f"  N={n:>9,}  {method:10s} {r['seconds']:8.1f}s ({r['seconds'] / base['seconds']:5.2f}x)   peak "
                  f"{r['peak_mb']:7.0f} MB ({r['peak_mb'] / base['peak_mb']:4.2f}x; {r['data_mb']:.0f} MB before clustering)"
                  f"   {r['clusters']} clusters")


def _ddp_worker(rank: int, size: int, threads: int, port: int, sync_bn: bool, steps: int, results) -> None:
    from stages.common import load_params
    from stages.data import ImageSet
    from stages.distributed import World, global_batchnorm, split_sample
    from stages.train import body_optimizer, head_optimizer, train_one_epoch

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if size > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    p = params["train"]
    batch = p["batch_size"]
    rng = np.random.default_rng(0)
    n = (steps + 5) * batch
    images = ImageSet(Path("."), {"mean": [0.29], "std": [0.35]}, np.arange(n).astype(str), np.zeros(n, np.int64),
                      rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), None)  # random pixels: speed only
    torch.manual_seed(0)
    model = build_model(params["model"], 1, 28)
    if size > 1 and sync_bn:
        model = global_batchnorm(model, torch.device("cpu"))
    optimizer = body_optimizer(model, p)
    model.reset_top_layer(312)  # the default run's clusters (20k images / 64)
    top_optimizer = head_optimizer(model, p)
    model = model.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model) if size > 1 else model
    world = World(rank=rank, size=size, local_rank=rank, local_size=size)
    share = {**p, "batch_size": batch // size}
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
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for name, size, threads, sync_bn in (("1 process x 2 threads", 1, 2, False),
                                         ("2 processes x 1 thread, sync_batchnorm", 2, 1, True),
                                         ("2 processes x 1 thread, per-process BN", 2, 1, False)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        results = ctx.Queue()
        procs = [ctx.Process(target=_ddp_worker, args=(r, size, threads, port, sync_bn, steps, results))
                 for r in range(size)]
        for proc in procs:
            proc.start()
        outs = [results.get() for _ in procs]
        for proc in procs:
            proc.join()
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
    import threading

    peak = [0.0]

    def sample() -> None:
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024.0)
            time.sleep(interval)

    threading.Thread(target=sample, daemon=True).start()
    return lambda: peak[0]


def _memory_worker(step: str, features: str, out: str, overrides: dict, results) -> None:
    from stages.cluster import run_cluster
    from stages.common import load_params
    from stages.layout import PCA_FEATURES
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
    import tempfile

    ctx = multiprocessing.get_context("spawn")  # a fresh process each: its peak memory is the step's alone
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
        rows = {}
        for step in ("baseline", "features in RAM", "pca", "cluster", "pca + cluster"):
            results = ctx.Queue()
            proc = ctx.Process(target=_memory_worker, args=(step, str(features), tmp, overrides, results))
            proc.start()
            rows[step] = results.get()
            proc.join()
        base, base_anon = rows["baseline"]["peak_mb"], rows["baseline"]["anon_mb"]
        for step, r in rows.items():
            print(f"  {step:16s} {r['seconds']:6.1f}s   peak RSS {r['peak_mb']:5.0f} MB = {r['peak_mb'] / size_mb:4.2f}x the "
                  f"features ({(r['peak_mb'] - base) / size_mb:4.2f}x above the baseline)   private (RssAnon) peak "
                  f"{r['anon_mb']:5.0f} MB = {(r['anon_mb'] - base_anon) / size_mb:4.2f}x the features above the baseline")


BENCHES = {"model": bench_model, "pca": bench_pca, "kmeans": bench_kmeans, "pic": bench_pic, "ddp": bench_ddp,
           "memory": bench_memory}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only these benchmarks")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="pic: numbers of points")
    args = parser.parse_args(argv)
    for name in args.only or BENCHES:
        BENCHES[name](tuple(args.sizes)) if name == "pic" else BENCHES[name]()


if __name__ == "__main__":
    main()
