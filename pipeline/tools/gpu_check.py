"""The GPU check: one command that runs the project's GPU paths on any machine with CUDA and prints a table.

    make gpu-check                                      # a machine with CUDA (see docs/gpus.md "The GPU check")
    python -m pipeline.tools.gpu_check --device cpu --tiny    # the same code on a CPU in under a minute (the tests)
    python -m pipeline.tools.gpu_check --bundle               # here: the Fashion-MNIST subset the check carries

Its rows: the environment and clustering plan, k-means on the GPU, two DeepCluster epochs of the stages'
own command lines on Fashion-MNIST (extract and train under torchrun, one process per GPU), AlexNet at
224 px on synthetic tensors and through the stages on a JPEG tree; what each runs: docs/gpus.md.

Where torch sees no CUDA GPU it says so and exits 0 (nothing to check). It needs only torch, numpy,
pandas, pyarrow, scipy and the three small packages the stages' params validation and progress bars use
(pydantic, pyyaml, tqdm: `make gpu-check` installs them from the carried wheels if they are missing);
no Prefect, DVC, MLflow, scikit-learn, matplotlib or faiss.

The data: the Fashion-MNIST subset written by `--bundle` (data/gpu-check/fashion-mnist: 10k training and
2k test images as gzipped IDX files, 5 MB, gitignored; carried to a GPU machine with the working tree),
else the Debian package's files, else synthetic IDX files (noted in the table).
"""
from __future__ import annotations

import argparse
import gzip
import importlib
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BUNDLE = Path("data/gpu-check")
SUBSET = BUNDLE / "fashion-mnist"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class CheckFailed(RuntimeError):
    pass


@dataclass
class Row:
    check: str
    result: str
    status: str = "ok"  # ok | FAILED | note


@dataclass
class Sizes:
    """How big each check is: the GPU sizes fit the whole check in a few minutes on one H200; --tiny runs
    the same code in seconds on a CPU."""
    train_images: int = 10_000
    test_images: int = 1_000
    width: int = 16
    fc_dim: int = 256
    pca_dim: int = 32
    batch: int = 256
    kmeans_points: int = 200_000
    kmeans_dim: int = 256
    kmeans_k: int = 1_000
    alexnet_batch: int = 256
    alexnet_steps: int = 20
    jpegs: int = 4_096
    jpeg_samples: int = 16_384  # train draws per epoch on the JPEG tree (with replacement): amortises start-up
    jpeg_arch: str = "alexnet"
    jpeg_crop: int = 224
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))

    @classmethod
    def tiny(cls) -> "Sizes":
        return cls(train_images=256, test_images=64, width=4, fc_dim=32, pca_dim=16, batch=64, kmeans_points=2_000,
                   kmeans_dim=32, kmeans_k=20, alexnet_batch=2, alexnet_steps=1, jpegs=16, jpeg_samples=16,
                   jpeg_arch="small_alexnet", jpeg_crop=64, workers=0)  # AlexNet's 4096-d PCA alone takes 30 s on a CPU


# ---------------------------------------------------------------- launching the stages
def stage_command(stage: str, args: list[str], nproc: int | None) -> list[str]:
    from stages.core.distributed import torchrun_command

    if nproc is None:
        return [sys.executable, "-m", f"stages.{stage}", *args]
    return torchrun_command(f"stages.{stage}", args, nproc)


def run_stage(stage: str, args: list[str], nproc: int | None = None) -> None:
    """A stage's command line: in this process (fast, no second torch import) or, for DDP, under torchrun."""
    if nproc is None:
        try:
            importlib.import_module(f"stages.{stage}").main(args)
        except SystemExit as e:  # the stages' cli_errors: one message, exit status 1
            if e.code not in (None, 0):
                raise CheckFailed(str(e.code)) from None
        return
    cmd = stage_command(stage, args, nproc)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise CheckFailed(f"{' '.join(cmd)} exited {done.returncode}: " + " | ".join(tail))


# ---------------------------------------------------------------- data
def write_idx(out: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """A split's gzipped IDX files (uint8), the format of the Fashion-MNIST distribution."""
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        with gzip.open(out / f"{split}-{kind}-ubyte.gz", "wb", compresslevel=9) as f:
            f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_subset(source: Path, out: Path, train: int = 10_000, test: int = 2_000, seed: int = 0) -> Path:
    """A seeded subset of Fashion-MNIST's IDX files (what --bundle writes for the GPU machine)."""
    from stages.core.runtime import seeded_subset
    from stages.prepare import read_idx

    out.mkdir(parents=True, exist_ok=True)
    for split, limit in (("train", train), ("t10k", test)):
        images = read_idx(source / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(source / f"{split}-labels-idx1-ubyte.gz")
        rows = seeded_subset(len(images), limit, seed)
        write_idx(out, split, images[rows], labels[rows])
    return out


def write_synthetic(out: Path, train: int, test: int, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped IDX files of 10 classes of blurred random shapes: what the check runs on where
    neither the carried subset nor the Debian package is there."""
    rng = np.random.default_rng(seed)
    protos = rng.random((10, 7, 7))
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        base = np.kron(protos[labels], np.ones((1, 4, 4)))  # 28 x 28
        write_idx(out, split, np.clip(255 * (0.8 * base + 0.2 * rng.random((n, 28, 28))), 0, 255), labels)
    return out


def fashion_mnist(requested: Path | None, scratch: Path, sizes: Sizes) -> tuple[Path, str]:
    for path, what in ((requested, "given"), (SUBSET, "carried subset"), (DEBIAN, "Debian package")):
        if path is not None and all((path / f"{name}.gz").exists() for name in IDX_FILES):
            return path, f"{what} ({path})"
    if requested is not None:
        raise CheckFailed(f"--data {requested} has no Fashion-MNIST IDX files ({', '.join(IDX_FILES)}, gzipped)")
    return write_synthetic(scratch / "synthetic-idx", sizes.train_images, sizes.test_images), \
        "synthetic images (no Fashion-MNIST here: `python -m pipeline.tools.gpu_check --bundle` where there is one)"


def write_jpeg_tree(root: Path, n: int, size: int = 256, classes: int = 8, seed: int = 0) -> Path:
    """n JPEGs of size x size in `classes` class folders: smooth random colour fields (decode cost of photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = (rng.random((n, 16, 16, 3)) * 255).astype(np.uint8)

    def save(i: int) -> None:
        folder = root / f"class{i % classes}"
        Image.fromarray(small[i]).resize((size, size), Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(save, range(n)))
    return root


# ---------------------------------------------------------------- the checks
@dataclass
class Check:
    device: str  # cuda | cpu
    gpus: int
    sizes: Sizes
    out: Path
    data: Path | None = None
    rows: list[Row] = field(default_factory=list)

    @property
    def nproc(self) -> int | None:
        """torchrun's processes for extract and train, or None: one plain process."""
        return self.gpus if self.device == "cuda" else None

    def epochs(self, run: Path, overrides: dict, epochs: int, label: str) -> list[dict]:
        """In `run`: params.yaml with the check's sizes and `overrides` (validated like any run's), prepare,
        train --init, then `epochs` epochs of extract, pca, cluster, labels, train; each epoch's reports."""
        import yaml

        from stages.core.io import read_json
        from stages.core.layout import RunLayout, report
        from stages.core.params import load_params
        from stages.epoch import EPOCH_CHAIN, stage_arguments

        s = self.sizes
        sized = {"run.epochs": 2, "prepare.max_train_images": s.train_images, "prepare.max_test_images": s.test_images,
                 "prepare.num_workers": max(1, s.workers), "model.width": s.width, "model.fc_dim": s.fc_dim,
                 "extract.device": self.device, "train.device": self.device, "extract.batch_size": 4 * s.batch,
                 "train.batch_size": s.batch, "pca.dim": s.pca_dim,
                 "cluster.device": "gpu" if self.device == "cuda" else "auto"}
        params, dataset = run / "params.yaml", run / "dataset"
        run.mkdir(parents=True, exist_ok=True)
        params.write_text(yaml.safe_dump(load_params("params.yaml", {**sized, **overrides}, origin="gpu-check")
                                         .model_dump(), sort_keys=False))
        run_stage("prepare", ["--params", str(params), "--out", str(dataset)])
        layout = RunLayout(dataset, run / "epochs", run / "checkpoints")
        run_stage("train", ["--params", str(params), "--dataset", str(dataset), "--init",
                            "--checkpoint-out", str(layout.checkpoint(0))])
        out = []
        for e in range(1, epochs + 1):
            timings = {}
            for stage in EPOCH_CHAIN:  # as the flow chains them, each through its own command line
                t = time.perf_counter()
                try:
                    run_stage(stage.name, ["--params", str(params), *stage_arguments(stage.name, layout, e)],
                              self.nproc if stage.distributed else None)
                except CheckFailed as err:
                    raise CheckFailed(f"{label}, epoch {e}, {stage.name}: {err}") from None
                timings[stage.name] = time.perf_counter() - t
            reports = {name: read_json(layout.epoch(e) / report(name)) for name in timings}
            out.append({"epoch": e, "wall": timings, **reports})
        return out

    # -- rows
    def environment(self) -> None:
        import torch

        from stages.core.clustering import faiss_gpu_count, plan_for

        py = f"Python {platform.python_version()}, torch {torch.__version__}"
        if torch.cuda.is_available():
            names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
            py += f" (CUDA {torch.version.cuda}), {torch.cuda.device_count()} x {', '.join(names)}"
        self.rows.append(Row("environment", py, "note"))
        faiss = faiss_gpu_count()
        faiss_text = "not installed" if faiss is None else f"installed, sees {faiss} GPU(s)"
        try:
            plan = plan_for("gpu" if self.device == "cuda" else "auto").describe()
        except Exception as e:  # noqa: BLE001 - reported in the table
            plan = f"none ({e})"
        self.rows.append(Row("clustering plan", f"faiss {faiss_text}; k-means runs as: {plan}", "note"))

    def kmeans(self) -> None:
        import torch

        from stages.core.assignments import nmi
        from stages.core.clustering import run_kmeans

        s = self.sizes
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(s.kmeans_k, s.kmeans_dim, generator=g)
        truth = torch.randint(0, s.kmeans_k, (s.kmeans_points,), generator=g)
        x = (centres[truth] + 0.3 * torch.randn(s.kmeans_points, s.kmeans_dim, generator=g)).numpy()
        device = "gpu" if self.device == "cuda" else "auto"
        run_kmeans(x[: 10 * s.kmeans_k], s.kmeans_k, 2, 0, device)  # warm-up (CUDA context, kernels)
        t = time.perf_counter()
        c = run_kmeans(x, s.kmeans_k, 20, 0, device)
        seconds = time.perf_counter() - t
        score = nmi(truth.numpy(), c.labels)
        self.rows.append(Row(f"k-means, {s.kmeans_points:,} x {s.kmeans_dim}, k = {s.kmeans_k}, 20 iterations",
                             f"{seconds:.2f}s, NMI with the true centres {score:.3f}, {c.n_empty()} empty",
                             "ok" if score > 0.8 else "FAILED"))

    def deepcluster(self) -> None:
        s = self.sizes
        data, what = fashion_mnist(self.data, self.out, s)
        run = self.out / "fashion-mnist"
        shutil.rmtree(run, ignore_errors=True)
        epochs = self.epochs(run, {"prepare.source": "fashion-mnist", "prepare.path": str(data)}, 2, "Fashion-MNIST")
        self.rows.append(Row("Fashion-MNIST data", what, "note"))
        for r in epochs:
            w, tr, lab, cl = r["wall"], r["train"], r["labels"], r["cluster"]
            nmi_prev = "" if lab["nmi_previous"] is None else f", NMI(t-1, t) {lab['nmi_previous']:.3f}"
            self.rows.append(Row(
                f"epoch {r['epoch']}: {r['extract']['n_images']:,} images, small_alexnet, {tr['device']}",
                f"extract {w['extract']:.1f}s, pca {w['pca']:.1f}s, cluster {w['cluster']:.1f}s ({cl['backend']}, "
                f"k = {cl['k']}), labels {w['labels']:.1f}s, train {w['train']:.1f}s ({tr['images_per_second']:,.0f} "
                f"img/s, loss {tr['loss']:.2f}); NMI(labels) {lab['nmi_labels']:.3f}{nmi_prev}"))
        self.rows.append(Row(f"DDP over {self.gpus} GPU(s)",
                             f"extract and train ran under torchrun --nproc_per_node={self.nproc}" if self.nproc else
                             "not run on the CPU", "ok" if self.nproc else "note"))

    def alexnet_tensors(self) -> None:
        """AlexNet at 224 on synthetic tensors: inference and training images/s, kept for the JPEG tree's row."""
        import torch

        from stages.core.models import build_model
        from stages.core.runtime import autocast

        s = self.sizes
        dev = torch.device(self.device)
        model = build_model({"arch": "alexnet", "sobel": True, "dropout": 0.5}, 3, 224)
        model.reset_top_layer(1000)
        model = model.to(dev).to(memory_format=torch.channels_last)
        x = torch.randn(s.alexnet_batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (s.alexnet_batch,), device=dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True

        def infer():
            model.eval()
            with torch.no_grad(), autocast(dev, "auto"):
                model.fc_features(x)

        def step():
            model.train()
            with autocast(dev, "auto"):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        rates = []
        for fn in (infer, step):
            fn()  # warm-up: cudnn autotuning, allocator
            sync()
            t = time.perf_counter()
            for _ in range(s.alexnet_steps):
                fn()
            sync()
            rates.append(s.alexnet_batch * s.alexnet_steps / (time.perf_counter() - t))
        amp = "bf16 autocast" if dev.type == "cuda" else "fp32"
        self.rows.append(Row(f"AlexNet 224 px, synthetic tensors, batch {s.alexnet_batch}, {amp} + channels_last",
                             f"inference {rates[0]:,.1f} img/s, training {rates[1]:,.1f} img/s (one {self.device} device)"))
        self._tensor_rates = rates

    def alexnet_jpegs(self) -> None:
        """AlexNet at 224 through the stages on a JPEG tree: the input pipeline's cost against the tensors."""
        s = self.sizes
        run = self.out / "jpeg-tree"
        shutil.rmtree(run, ignore_errors=True)
        t = time.perf_counter()
        tree = write_jpeg_tree(run / "images", s.jpegs)
        written = time.perf_counter() - t
        r = self.epochs(run, {
            "prepare.source": "imagefolder", "prepare.path": str(tree),
            "prepare.image_size": 256, "prepare.max_train_images": None, "prepare.max_test_images": None,
            "model.arch": s.jpeg_arch, "extract.crop_size": s.jpeg_crop, "train.crop_size": s.jpeg_crop,
            "train.lr": 0.01,  # AlexNet diverges at the small model's 0.1 (the paper: 0.05 at batch 256)
            "extract.batch_size": s.alexnet_batch, "train.batch_size": s.alexnet_batch,
            "extract.num_workers": s.workers, "train.num_workers": s.workers, "train.samples_per_epoch": s.jpeg_samples,
            "cluster.k": max(2, min(100, s.jpegs // 8)), "pca.dim": min(32, s.pca_dim)}, 1, "JPEG tree")[0]
        extract_rate = r["extract"]["n_images"] / r["extract"]["seconds"]
        train_rate = r["train"]["images_per_second"]
        tensors = getattr(self, "_tensor_rates", None)
        same = s.jpeg_arch == "alexnet" and tensors  # else the ratio to AlexNet's tensors means nothing
        rates = [f"{what} stage {rate:,.0f} img/s" + (f" ({rate / tensor:.2f}x tensors)" if same else "")
                 for what, rate, tensor in zip(("extract", "train"), (extract_rate, train_rate), tensors or (1, 1))]
        model = "AlexNet 224 px" if s.jpeg_arch == "alexnet" else f"{s.jpeg_arch} {s.jpeg_crop} px"
        self.rows.append(Row(f"{model}, JPEG tree ({s.jpegs:,} x 256 px, written in {written:.1f}s), "
                             f"{s.workers} loader workers", ", ".join(rates) + "; stage times include start-up"))

    def run_all(self) -> None:
        for name, fn in (("environment", self.environment), ("k-means", self.kmeans),
                         ("DeepCluster epochs", self.deepcluster), ("AlexNet tensors", self.alexnet_tensors),
                         ("AlexNet JPEG tree", self.alexnet_jpegs)):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - every check gets its row, the others still run
                self.rows.append(Row(name, f"{type(e).__name__}: {e}", "FAILED"))


def table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'check'.ljust(width)}  status   result", f"{'-' * width}  -------  ------"]
    lines += [f"{r.check.ljust(width)}  {r.status.ljust(7)}  {r.result}" for r in rows]
    return "\n".join(lines)


def skip_reason(device: str) -> str | None:
    """Why there is nothing to check (no CUDA GPU for torch), or None."""
    import torch

    if device == "cpu" or torch.cuda.is_available():
        return None
    return (f"torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda or 'none'}), so there is "
            "nothing to check here; `--device cpu --tiny` runs the check's code on the CPU")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto/cuda: the GPUs (skips, exit 0, without one); cpu: the same code on the CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the code path in seconds (tests, CI)")
    parser.add_argument("--data", type=Path, help="a folder of Fashion-MNIST IDX .gz files (default: the carried "
                        f"subset {SUBSET}, else {DEBIAN}, else synthetic)")
    parser.add_argument("--out", type=Path, default=BUNDLE / "run", help="scratch folder for the check's runs")
    parser.add_argument("--bundle", action="store_true", help=f"write the Fashion-MNIST subset to {SUBSET} and stop")
    args = parser.parse_args(argv)
    if args.bundle:
        out = write_subset(args.data or DEBIAN, SUBSET)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"gpu-check: Fashion-MNIST subset (10,000 train, 2,000 test) -> {out}, {size / 1e6:.1f} MB")
        return 0
    if reason := skip_reason(args.device):
        print(f"gpu-check: skipped: {reason}")
        return 0
    import torch

    device = "cpu" if args.device == "cpu" else "cuda"
    check = Check(device, torch.cuda.device_count() if device == "cuda" else 0,
                  Sizes.tiny() if args.tiny else Sizes(), args.out, args.data)
    t = time.perf_counter()
    check.run_all()
    print(table(check.rows))
    failed = [r for r in check.rows if r.status == "FAILED"]
    print(f"gpu-check: {len(check.rows)} rows, {len(failed)} failed, {time.perf_counter() - t:.0f}s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
