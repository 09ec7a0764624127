"""k-means ACC at k = classes under three readings, for a trained network and the random networks of run seeds
RUN_SEED, + 1, + 2 (built as evaluate builds them), on the held-out images evaluate scores:
  fc, mean of single runs       what evaluate reports (the first 10 of 50 k-means seeds);
  fc, best of 10 by objective   per block of 10 seeds, the run with the lowest k-means objective (label-free),
                                five blocks: mean and sd;
  best conv layer               the same two readings on the conv layer evaluate's kNN uses (chosen leave-one-out
                                on the probe-train images).
docs/results.md, "Where the clusters gain". Run from the repository root:
    python docs/scripts/kmeans_estimators.py PARAMS DATASET TRAINED.pt RUN_SEED EVAL_SEED"""
import json
import sys

import numpy as np
import torch

from stages.core.checkpoints import load_checkpoint, model_from_checkpoint
from stages.core.clustering import run_kmeans
from stages.core.params import load_params
from stages.core.probes import clustering_scores
from stages.core.whitening import fit_pca_whitening
from stages.evaluate import choose_knn_layer, evaluation_data, network_features, seeded_init_network

params_file, dataset, trained_file, run_seed, eval_seed = sys.argv[1:]
params, run_seed, eval_seed, dev = load_params(params_file), int(run_seed), int(eval_seed), torch.device("cpu")
data = evaluation_data(params.evaluate, dataset, eval_seed)
trained = load_checkpoint(trained_file, dev)
nets = {"trained": trained} | {f"random{run_seed + i}": seeded_init_network(params, dataset, trained, run_seed + i, dev)
                               for i in range(3)}
for name, ckpt in nets.items():
    train, test = network_features(model_from_checkpoint(ckpt, dev), data, params, dev)  # as evaluate extracts
    conv = choose_knn_layer({k: v for k, v in train.items() if k.startswith("conv")}, data.y_train, params.evaluate,
                            data.n_classes)[0]
    row = {"network": name, "conv_layer": conv}
    for layer in ("fc", conv):
        whitening = fit_pca_whitening(test[layer], min(params.pca.dim, test[layer].shape[1]), params.pca.eps)
        x = whitening.transform(test[layer])
        runs = [run_kmeans(x, data.n_classes, params.cluster.niter, eval_seed + j) for j in range(50)]
        acc = np.array([clustering_scores(data.y_test, c.labels)["acc"] for c in runs])
        objective = np.array([c.objective[-1] for c in runs])
        best = [10 * b + int(np.argmin(objective[10 * b:10 * b + 10])) for b in range(5)]
        row["fc" if layer == "fc" else "conv"] = {"mean_of_single": acc[:10].mean(), "sd_of_single": acc[:10].std(),
                                                 "best_of_10": acc[best].mean(), "sd_best_of_10": acc[best].std()}
    print(json.dumps(row, default=float), flush=True)
