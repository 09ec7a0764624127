"""k-means on held-out fc features (PCA-whitened to pca.dim, as evaluate does) at k = 10 ... 320: purity (each
cluster counted as its majority class) and NMI against the labels, and ACC at k = 10, mean over 5 k-means seeds,
for a trained network and the random networks of run seeds RUN_SEED, + 1, + 2 (as evaluate builds them).
docs/results.md, "Where the clusters gain". Run from the repository root:
    python docs/scripts/kmeans_granularity.py PARAMS DATASET TRAINED.pt RUN_SEED EVAL_SEED"""
import json
import sys

import numpy as np
import torch

from stages.core.checkpoints import load_checkpoint, model_from_checkpoint
from stages.core.clustering import run_kmeans
from stages.core.params import load_params
from stages.core.probes import clustering_scores, extract_layer_features
from stages.core.whitening import fit_pca_whitening
from stages.evaluate import evaluation_data, extraction_options, seeded_init_network

params_file, dataset, trained_file, run_seed, eval_seed = sys.argv[1:]
params, run_seed, eval_seed, dev = load_params(params_file), int(run_seed), int(eval_seed), torch.device("cpu")
data = evaluation_data(params.evaluate, dataset, eval_seed)
y, trained = data.y_test, load_checkpoint(trained_file, dev)
nets = {"trained": trained} | {f"random{run_seed + i}": seeded_init_network(params, dataset, trained, run_seed + i, dev)
                               for i in range(3)}
purity = lambda c: sum(np.bincount(y[c == j]).max() for j in np.unique(c)) / len(y)
for name, ckpt in nets.items():
    model = model_from_checkpoint(ckpt, dev)
    kw = extraction_options(params, dev)
    fc = extract_layer_features(model, data.test, data.test_rows, ["fc"], **kw).pooled["fc"]
    x = fit_pca_whitening(fc, params.pca.dim, params.pca.eps).transform(fc)
    row = {"network": name}
    for k in (10, 20, 40, 80, 160, 320):
        runs = [run_kmeans(x, k, params.cluster.niter, eval_seed + j).labels for j in range(5)]
        p, scores = [purity(c) for c in runs], [clustering_scores(y, c) for c in runs]
        row[k] = {"purity": np.mean(p), "purity_sd": np.std(p), "nmi": np.mean([s["nmi"] for s in scores]),
                  "acc": np.mean([s["acc"] for s in scores]), "acc_sd": np.std([s["acc"] for s in scores])}
    print(json.dumps(row, default=float), flush=True)
