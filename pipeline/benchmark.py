"""Benchmarks behind the defaults: prints figures as ratios against a baseline measured in the same run.

    python -m pipeline.benchmark            # all
    python -m pipeline.benchmark --only model

model: small_alexnet inference and training throughput, fp32 (baseline) vs channels_last vs bf16
       autocast; why `amp: auto` keeps fp32 on the CPU.
pca:   our covariance + scipy partial eigh (stages.pca) vs faiss.PCAMatrix(d, dim, -0.5).
kmeans: faiss k-means on all points (what stages.cluster does) vs faiss's default subsampling.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import faiss
import numpy as np
import torch

from stages.cluster import run_kmeans
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


BENCHES = {"model": bench_model, "pca": bench_pca, "kmeans": bench_kmeans}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only these benchmarks")
    args = parser.parse_args(argv)
    for name in args.only or BENCHES:
        BENCHES[name]()


if __name__ == "__main__":
    main()
