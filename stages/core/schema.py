"""The one schema of params.yaml: every section and key, its type, its allowed values and why its
default is what it is. The defaults' values live in params.yaml only; this module says what a valid
value is, and `validate` turns anything else into one StageError naming the key, the value and the fix.

    python -m stages.core.params --markdown    # the parameter table (docs/params.md)
"""
from __future__ import annotations

import difflib
import math
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      StringConstraints, ValidationError)

from stages.core.errors import StageError

# Appended to every refusal: where the user finds what each key means and accepts.
DOCS = "Every key, its allowed values and its meaning: `python -m stages.core.params --markdown` (docs/params.md)"


# ------------------------------------------------------------------ value types
class Allowed:
    """Annotated metadata: the allowed values in words, for messages and the table of docs/params.md."""

    def __init__(self, text: str, numeric: bool = False):
        self.text, self.numeric = text, numeric


def _number(value: Any) -> Any:
    # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string: accept any numeric string as a float.
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return float(value) if isinstance(value, str) else value  # a ValueError for "abc": a value refused


def _whole(value: Any) -> Any:
    # 1e4 (a string to YAML 1.1) or 10000.0 is the whole number 10000; 10.5 or true is not a count.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def Int(ge: int, *, null: str | None = None, word: str | None = None) -> Any:
    """A whole number ≥ ge; `null` / `word`: what null / that word means instead."""
    text = f"int ≥ {ge}" + (f", or {word}" if word else "") + (f", or null ({null})" if null else "")
    core: Any = Annotated[StrictInt, BeforeValidator(_whole), at.Ge(ge)]
    if word:
        core = Union[core, Literal[word]]
    if null:
        core = Union[core, None]
    return Annotated[core, Allowed(text, numeric=True)]


def _float_type(gt=None, ge=None, lt=None, le=None) -> Any:
    bounds = [bound(v) for bound, v in ((at.Gt, gt), (at.Ge, ge), (at.Lt, lt), (at.Le, le)) if v is not None]
    return Annotated[float, BeforeValidator(_number), AfterValidator(_finite), *bounds]


def Float(gt=None, ge=None, lt=None, le=None) -> Any:
    """A real number in the given interval (ints and strings such as "1e-3" are read as floats)."""
    lo, hi = (gt if gt is not None else ge), (lt if lt is not None else le)
    lo_open, hi_open = gt is not None, lt is not None
    interval = (f"{'>' if lo_open else '≥'} {lo:g}" if hi is None
                else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
    return Annotated[_float_type(gt, ge, lt, le), Allowed(f"float {interval}", numeric=True)]


def Choice(*values: Any, text: str | None = None) -> Any:
    return Annotated[Literal[values], Allowed(text or " | ".join(str(v).lower() for v in values))]


def _ascending(values: list[float]) -> list[float]:
    if values != sorted(values):
        raise ValueError("not in increasing order")
    return values


CropScale = Annotated[list[_float_type(gt=0, le=1)], at.Len(2, 2), AfterValidator(_ascending),
                      Allowed("[min, max], floats in (0, 1], min ≤ max", numeric=True)]
WeightDecays = Annotated[list[_float_type(gt=0)], at.Len(1), Allowed("a list of floats > 0 (at least one)",
                                                                      numeric=True)]
Device = Annotated[StrictStr, StringConstraints(pattern=r"^(auto|cpu|cuda(:\d+)?)$"),
                   Allowed("auto | cpu | cuda | cuda:N")]
Amp = Annotated[Union[StrictBool, Literal["auto"]], Allowed("auto | true | false")]
Bool = Annotated[StrictBool, Allowed("true | false")]
Endpoint = Annotated[StrictStr, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]+:[0-9]{1,5}$"), Allowed("host:port")]
Location = Annotated[StrictStr, at.MinLen(1), Allowed("a path")]
Layers = Annotated[list[StrictStr], Allowed("a list of layer names, e.g. [conv1, conv3, conv5]")]
LayersOrAll = Annotated[Union[Literal["all"], Annotated[list[StrictStr], at.MinLen(1)]],
                        Allowed("all, or a list of layer names, e.g. [conv3, fc]")]


def doc(text: str) -> Any:
    """A required key (its default lives in params.yaml) and its one-line documentation."""
    return Field(description=text)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # one Params, shared by every stage: none may change it


# ------------------------------------------------------------------ the sections
class Run(Section):
    seed: Int(0) = doc("seeds every stage's randomness (per epoch and purpose), so a run is reproducible on one machine "
                       "(another CPU's floating-point sums take it elsewhere, "
                       "docs/results.md \"Figures of the default run\")")
    epochs: Int(1) = doc("NMI(t-1, t) rises, then saturates near 0.8 (paper Fig. 2b); the paper trains 500")
    nproc_per_node: Int(1) = doc("processes per node for extract and train (torchrun, one per GPU); 1 = in-process, "
                                 "as on a single CPU or GPU")
    nnodes: Int(1) = doc("machines taking part in extract and train; each runs the same command with its own "
                         "run.node_rank (docs/operations.md \"Several GPUs, several nodes\")")
    node_rank: Int(0) = doc("this machine's number, 0..nnodes-1; node 0 runs the flow and the other stages")
    rdzv_endpoint: Endpoint = doc("host:port of node 0 where the nodes meet; only read when nnodes > 1 (one node "
                                  "finds a free local port itself)")
    dist_backend: Choice("auto", "gloo", "nccl") = doc("auto = nccl on GPUs, gloo on CPUs (nccl has no CPU tensors)")


class Prepare(Section):
    source: Choice("fashion-mnist", "imagefolder", "folder") = doc(
        "the embedded Fashion-MNIST IDX files, a labelled class-per-folder tree, or an unlabelled folder")
    path: Location = doc("where the source lives")
    max_train_images: Int(1, null="all") = doc("a seeded subset keeps the default run short on a CPU")
    max_test_images: Int(1, null="all") = doc("the held-out split is only used for evaluation")
    image_size: Int(1) = doc("image trees only: the square (short side resized, centre-cropped) that the pictures "
                             "show and the channel mean/std are measured on; training and extract crop the "
                             "original images (extract.crop_size, train.crop_size)")
    num_workers: Int(0) = doc("threads that read image headers (format, size; no decoding) to check each file; 0 = "
                              "in this thread")


class Model(Section):
    arch: Choice("small_alexnet", "alexnet", "vgg16") = doc(
        "small_alexnet for 28-96 px images; alexnet and vgg16 are the paper's, for 224 px")
    sobel: Bool = doc("fixed Sobel input layer (paper); false = the raw-pixel ablation")
    width: Int(1) = doc("small_alexnet only: conv widths 2w,4w,6w,6w,4w; 16 gave the probe accuracy of 32 at a "
                        "third of the cost")
    fc_dim: Int(1) = doc("small_alexnet only: width of the fc layers (the clustered features)")
    dropout: Float(ge=0, lt=1) = doc("dropout of the fc layers, as in AlexNet and the paper")


# extract and train read image trees alike
LOADER_WORKERS = ("DataLoader processes that decode and crop image trees; 0 = in this process; auto = the usable "
                  "cores (per rank under torchrun), and 0 for in-memory arrays, which workers only slow down")
JPEG_DECODING = ("image trees: cpu = PIL in the DataLoader workers; gpu = JPEGs decoded with nvJPEG on the CUDA "
                 "device (torchvision.io.decode_jpeg), for when the CPUs cannot keep up; not measured on a GPU yet "
                 "(make gpu-check)")


class Extract(Section):
    crop_size: Int(1) = doc("centre view: short side resized to round(crop_size * 256/224), centre crop of "
                            "crop_size (the paper's 256 -> 224 at 224); arrays: centre crop only")
    batch_size: Int(1) = doc("images per forward pass; any value gives the same features")
    amp: Amp = doc("bf16 autocast on GPU; auto keeps fp32 on CPU, where bf16 is slower")
    num_workers: Int(0, word="auto") = doc(LOADER_WORKERS)
    decode: Choice("cpu", "gpu") = doc(JPEG_DECODING)
    device: Device = doc("auto = a CUDA GPU when torch sees one, else the CPU")
    keep_features_every: Int(0) = doc("keep every n-th epoch's features.npy (N x D float32 each); 0 = none")


class Pca(Section):
    dim: Int(1) = doc("the paper uses 256 for 4096-d AlexNet features; whitening many weak directions of 256-d "
                      "features amplifies noise")
    eps: Float(gt=0) = doc("relative to the largest eigenvalue, added to every eigenvalue before whitening")
    max_fit_rows: Int(2) = doc("PCA is fitted on at most this many rows, applied to all")


class Pic(Section):
    neighbours: Int(1) = doc("exact k-NN graph, 5 neighbours (paper)")
    sigma: Float(gt=0) = doc("edge weights exp(-d^2 / sigma^2) on L2-normalised features (paper)")
    alpha: Float(gt=0, lt=1) = doc("power-iteration damping, v <- normalise(alpha W v + (1 - alpha)/n) (paper)")
    iterations: Int(1) = doc("power iterations (paper)")
    graph: Choice("exact", "ivf") = doc("exact k-NN (paper; O(N^2), fine on a GPU) or ivf (approximate, for millions "
                                        "of images on a CPU)")


class Cluster(Section):
    method: Choice("kmeans", "pic") = doc("k-means (paper) or Power Iteration Clustering (paper appendix)")
    k: Int(2, word="auto") = doc("auto = N / images_per_cluster; over-segmentation (k >> classes) learns better "
                                 "(paper Fig. 2c)")
    images_per_cluster: Int(1) = doc("with k: auto: 312 clusters of 20k images; the paper's ImageNet k = 10,000 is 128")
    niter: Int(1) = doc("k-means iterations (faiss's default, as in the paper's code)")
    refill_below: Float(ge=0, lt=1) = doc(
        "k-means only: a cluster under this share of the mean size N/k is refilled as the paper refills an empty "
        "one (its centroid bisects the largest cluster, its images join their next nearest); 0 = off: small "
        "clusters hold under 3 % of an epoch's draws (docs/results.md \"Small clusters\")")
    device: Choice("auto", "cpu", "gpu") = doc(
        "auto = faiss on every GPU it sees (sharded index), else torch k-means on one GPU where faiss has none, "
        "else faiss on the CPU; cpu forces the CPU; gpu refuses to run without a GPU")
    pic: Pic = doc("Power Iteration Clustering (paper appendix); used when method: pic")


class Train(Section):
    lr: Float(gt=0) = doc("the paper's 0.05 learnt less on small grey images")
    lr_schedule: Choice("constant", "cosine") = doc("constant (paper) | cosine: decays from lr towards 0 over "
                                                    "run.epochs")
    momentum: Float(ge=0, lt=1) = doc("SGD momentum (paper)")
    weight_decay: Float(ge=0) = doc("L2 penalty of SGD; the paper's 1e-5 let k-means on the fc features fall "
                                    "after epoch 8, 2e-3 cost kNN")
    batch_size: Int(1) = doc("4x the SGD steps of 256 per epoch at similar cost: the loss leaves ln(k) in the "
                             "first epoch")
    crop_size: Int(1) = doc("random resized crops of this size (for image trees, of the original image, as the "
                            "paper)")
    crop_scale: CropScale = doc("RandomResizedCrop area range; the paper's 0.08 crops most of a 28 px garment away")
    hflip: Bool = doc("random horizontal flips (paper)")
    intensity_jitter: Float(ge=0, lt=1) = doc("per-image contrast x U(1-s, 1+s) and brightness + U(-s, s) std, "
                                              "so that clusters form on shape, not contrast; 0 = none")
    sync_batchnorm: Bool = doc("several processes: BatchNorm statistics over the global batch, as one process "
                               "computes them; the recipe's batch of 64 split over 8 GPUs would leave 8 images per "
                               "process's statistics")
    amp: Amp = doc("bf16 autocast on GPU; auto keeps fp32 on CPU, where bf16 is slower")
    samples_per_epoch: Int(1, null="max(N, min_samples_per_epoch)") = doc(
        "images drawn (uniformly over clusters) per epoch; null = one per training image (paper), at least "
        "min_samples_per_epoch")
    min_samples_per_epoch: Int(0) = doc(
        "with samples_per_epoch: null, the fewest draws per epoch: the head is new each epoch, and a small data "
        "set's one draw per image leaves too few SGD steps per clustering to move its features off random init")
    num_workers: Int(0, word="auto") = doc(LOADER_WORKERS)
    decode: Choice("cpu", "gpu") = doc(JPEG_DECODING)
    device: Device = doc("auto = a CUDA GPU when torch sees one, else the CPU")
    keep_checkpoint_every: Int(0) = doc("keep every n-th epoch's checkpoint (plus last.pt); 0 = only the last")


class Evaluate(Section):
    train_images: Int(1, null="all") = doc("seeded subset of the train split that probes and kNN learn from")
    test_images: Int(1, null="all") = doc("seeded subset of the held-out split to test on")
    probe_layers: LayersOrAll = doc("all = every conv block (conv1..conv5 for AlexNets) and fc")
    probe_dim: Int(1) = doc("conv activations average-pooled to at most this many dims (paper: ~9k for AlexNet)")
    probe_weight_decays: WeightDecays = doc("L2 grid; each probe keeps the best on held-out training images")
    probe_iters: Int(1) = doc("L-BFGS iterations per fit (preconditioned, so tens of iterations converge)")
    probe_val_fraction: Float(gt=0, lt=1) = doc("share of the probe's training images held out to choose the "
                                                "weight decay")
    knn_k: Int(1) = doc("weighted kNN (Wu et al. 2018) on fc and on the best conv layer: k neighbours, votes exp(cos / T)")
    knn_temperature: Float(gt=0) = doc("the T of the kNN votes (Wu et al. 2018)")
    kmeans_runs: Int(1) = doc("k-means (k = classes) on the held-out features, averaged over this many seeds (one "
                              "run's ACC moves by points)")
    random_inits: Int(1) = doc("random networks (run.seed, run.seed + 1, ...) whose best conv probe, kNN and "
                               "k-means are averaged: the random network alone moves kNN by about 2 points; the "
                               "first, the run's own epoch 0, also has every layer probed and is pictured")
    pictures: Bool = doc("draw the filter, neighbour and cluster pictures")
    picture_layers: Layers = doc("layers whose filters get a synthetic image and their top-9 images")
    picture_filters: Int(1) = doc("filters shown per layer (the most selective ones)")
    ascent_steps: Int(0) = doc("gradient-ascent steps for the synthetic filter images; 0 = top-9 images only")
    ascent_lr: Float(gt=0) = doc("step size of that gradient ascent")
    picture_queries: Int(1) = doc("nearest-neighbour queries (held-out images)")
    picture_neighbours: Int(1) = doc("neighbours shown per query, random init vs trained")
    picture_clusters: Int(1) = doc("clusters of the last epoch shown ...")
    picture_cluster_images: Int(1) = doc("... with this many random members each")


class Params(Section):
    run: Run = doc("the run as a whole")
    prepare: Prepare = doc("the dataset")
    model: Model = doc("the network")
    extract: Extract = doc("features of the previous epoch's network")
    pca: Pca = doc("PCA-whitening and L2 normalisation before clustering")
    cluster: Cluster = doc("the pseudo-labels")
    train: Train = doc("one epoch of training on the pseudo-labels")
    evaluate: Evaluate = doc("`evaluate final`: probes, kNN, clustering quality and pictures on the held-out split")


# ------------------------------------------------------------------ the keys, as data
def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def _allowed(info) -> Allowed:
    return next(m for m in info.metadata if isinstance(m, Allowed))


def leaf_fields(model: type[Section] = Params, prefix: str = "") -> dict[str, Any]:
    """Every key as {"cluster.k": FieldInfo}, in params.yaml's order."""
    out = {}
    for name, info in model.model_fields.items():
        if _is_section(info.annotation):
            out.update(leaf_fields(info.annotation, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info
    return out


def sections(model: type[Section] = Params, prefix: str = "") -> dict[str, type[Section]]:
    """Every section (and sub-section) as {"cluster.pic": Pic}; the root is ""."""
    out = {prefix.rstrip("."): model}
    for name, info in model.model_fields.items():
        if _is_section(info.annotation):
            out.update(sections(info.annotation, f"{prefix}{name}."))
    return out


def allowed(key: str) -> str:
    return _allowed(leaf_fields()[key]).text


def numeric_keys() -> list[str]:
    return [k for k, info in leaf_fields().items() if _allowed(info).numeric]


def markdown_table() -> str:
    rows = ["| key | allowed values | what it is, and why the default |", "|---|---|---|"]
    for key, info in leaf_fields().items():
        cells = (f"`{key}`", _allowed(info).text, info.description)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------ validation
def suggestion(dotted: str) -> str:
    """'did you mean ...?' for an unknown dotted key, or the keys that exist where it points."""
    keys = list(leaf_fields())
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    parent = dotted.rpartition(".")[0]
    known = [k for k in keys if k.startswith(parent + ".")] if parent and parent in sections() else list(Params.model_fields)
    return f"the known ones are {', '.join(known)}"


def sentence(text: str) -> str:
    return text if text.endswith(("?", ".", "!")) else text + "."


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _leaf_of(loc: tuple) -> str | None:
    """The key an error is about: the longest prefix of its location that is a key (a union or a list
    adds type tags and indices after it)."""
    keys = leaf_fields()
    for n in range(len(loc), 0, -1):
        if _dotted(loc[:n]) in keys:
            return _dotted(loc[:n])
    return None


def problems(params: Any, source: str = "params.yaml", overridden: dict | None = None,
             origin: str = "override") -> list[str]:
    """What is wrong with `params` (empty: nothing), one sentence per problem, each with its fix.

    overridden: the dotted keys set by overrides (--set, a deployment's overrides, a preset), so their
    problems name the override rather than the file.
    """
    overridden = overridden or {}
    if not isinstance(params, dict):
        return [f"{source} must be a mapping of sections (run:, prepare:, model:, ...), not "
                f"{type(params).__name__}: restore it (`git checkout {source}`)"]
    try:
        Params.model_validate(params)
        return combination_problems(params, source, overridden, origin)
    except ValidationError as e:
        errors = e.errors()
    secs = sections()
    missing = {_dotted(err["loc"]) for err in errors if err["type"] == "missing"}
    out, done = [], set()
    # Unknown names first: a renamed key is reported once, as unknown with its suggestion, not also as missing.
    for err in (e for e in errors if e["type"] == "extra_forbidden"):
        loc = tuple(err["loc"])
        parent, name = _dotted(loc[:-1]), str(loc[-1])
        prefix = f"{parent}." if parent else ""
        close = difflib.get_close_matches(name, list(secs[parent].model_fields), n=1, cutoff=0.6)
        hint = (f"did you mean {prefix + close[0]!r}?" if close
                else f"the known ones are {', '.join(prefix + k for k in secs[parent].model_fields)}")
        what = "key" if parent else "section"
        if close and prefix + close[0] in missing:
            done.add(prefix + close[0])
            hint += f" ({prefix + close[0]} is missing: rename it)"
        else:
            hint += " (remove it)" if not close else f" ({prefix + close[0]} is set too: remove this one)"
        out.append(f"unknown {what} {_dotted(loc)!r} in {source}: {hint}")
    for err in (e for e in errors if e["type"] != "extra_forbidden"):
        loc, kind = tuple(err["loc"]), err["type"]
        where = _dotted(loc)
        if kind == "missing":
            if where not in done:
                what = "section" if where in secs else "key"
                out.append(f"{source} has no {what} {where!r}: add it (`git show HEAD:params.yaml` has the project's "
                           "defaults)")
            continue
        if where in secs:  # a section that is not a mapping (e.g. left empty)
            keys = ", ".join(secs[where].model_fields)
            out.append(f"section {where!r} in {source} must hold the keys {keys}, not {err['input']!r}: restore it "
                       "(`git show HEAD:params.yaml` has the project's defaults)")
            continue
        key = _leaf_of(loc)
        if key is None or key in done:
            continue
        done.add(key)
        given = (f"{origin} {key}={overridden[key]!r}" if key in overridden
                 else f"{key}: {_value_at(params, key)!r} in {source}")
        out.append(f"{given} is not allowed: {key} must be {allowed(key)}; set it to an allowed value")
    return out


def combination_problems(params: dict, source: str, overridden: dict, origin: str) -> list[str]:
    """Values each allowed alone but not together."""
    out = []
    cluster = params["cluster"]

    def given(key: str) -> str:
        name = key.split(".", 1)[1]
        return (f"{origin} {key}={overridden[key]!r}" if key in overridden
                else f"{key}: {cluster[name]!r} in {source}")

    if cluster["method"] == "pic" and cluster["k"] != "auto":
        out.append(f"{given('cluster.k')} with cluster.method: pic is not allowed: PIC finds the number of clusters "
                   "itself; set cluster.k: auto (or use cluster.method: kmeans)")
    if cluster["method"] == "pic" and cluster["refill_below"] > 0:
        out.append(f"{given('cluster.refill_below')} with cluster.method: pic is not allowed: PIC's clusters are the "
                   "trees of its graph, not centroids to refill; set cluster.refill_below: 0 (or use "
                   "cluster.method: kmeans)")
    return out


def _value_at(params: dict, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(params: Any, source: str = "params.yaml", overridden: dict | None = None,
             origin: str = "override") -> Params:
    """The params as a frozen Params, validated and normalised (e.g. "1e-3" -> 0.001); else one StageError
    listing every problem."""
    found = problems(params, source, overridden, origin)
    if found:
        if len(found) == 1:
            raise StageError(f"{sentence(found[0])} {DOCS}")
        raise StageError(f"{len(found)} problems with the parameters:\n  - " + "\n  - ".join(found) + f"\n{DOCS}")
    return Params.model_validate(params)
