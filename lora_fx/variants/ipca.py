"""Incremental PCA over batches (scikit-learn's algorithm, as PEFT's ``IncrementalPCA`` runs it for EVA), with a
seeded ``torch.svd_lowrank``: each ``partial_fit`` stacks the previous components (scaled by their singular values),
the new batch centred on its own mean, and a mean correction row, and takes the SVD of that::

    X' = [S·Vᵀ; X - mean(X); sqrt(n_seen·n / n_total) · (mean_seen - mean(X))],   X' ≈ U S Vᵀ (q = 2k, 4 iterations)

Example::

    pca = IncrementalPCA(8, seed=42)
    pca.partial_fit(batch); pca.components_, pca.explained_variance_ratio_
"""

from __future__ import annotations

import torch


class IncrementalPCA:
    def __init__(self, n_components: int, seed: int | None = 42, niter: int = 4) -> None:
        self.n_components, self.seed, self.niter = n_components, seed, niter
        self.q = 2 * n_components
        self.components_: torch.Tensor | None = None

    def partial_fit(self, x: torch.Tensor) -> IncrementalPCA:
        x = x.clone()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        first = self.components_ is None
        if first:
            self.mean_, self.var_ = None, None
            self.n_samples_seen_ = torch.tensor([0], device=x.device)
        n = x.shape[0]
        mean, var, total = _mean_and_var(x, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / total) * n)
            x = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, x,
                              factor * (self.mean_ - batch_mean)))
        with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device],
                                   enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            u, s, v = torch.svd_lowrank(x, q=self.q, niter=self.niter)
        vt = v.mH
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])  # deterministic signs
        vt = vt * signs.view(-1, 1)
        self.n_samples_seen_, self.mean_, self.var_ = total, mean, var
        self.components_ = vt[:self.n_components]
        self.singular_values_ = s[:self.n_components]
        self.explained_variance_ratio_ = (s ** 2 / torch.sum(var * total))[:self.n_components]
        return self


def _mean_and_var(x, last_mean, last_var, last_count):
    new_count = torch.tensor([x.shape[0]], device=x.device)
    count = last_count + new_count
    last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None \
        else last_mean * last_count
    new_sum = x.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / count
    centred = x - new_sum / new_count
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    new_var = centred.square().sum(dim=0, dtype=torch.float64) - correction / new_count
    if last_var is None:
        return mean, new_var / count, count
    ratio = last_count.double() / new_count
    var = last_var * last_count + new_var + ratio / count * (last_sum / ratio - new_sum).square()
    return mean, var / count, count
