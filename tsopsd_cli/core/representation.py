"""Hidden-state similarity between two models on the same tokens: linear CKA and mean cosine. Pure torch."""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) of two representations of the same N tokens.
    x: [N, D1], y: [N, D2] -> scalar in [0, 1]; 1 for representations equal up to rotation and scale."""
    x = x.double()
    y = y.double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if norm <= 0:
        return float("nan")
    return float(cross / norm)


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens of cos(x_i, y_i).  x, y: [N, D] -> scalar"""
    return float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean())


class LayerSimilarity:
    """Accumulates per-layer hidden states of two models over batches, keeping at most `max_tokens` tokens
    (the first ones seen) so that memory stays bounded for large models; cosine uses every token."""

    def __init__(self, max_tokens: int = 4096):
        self.max_tokens = max_tokens
        self.x: dict[int, list[torch.Tensor]] = {}
        self.y: dict[int, list[torch.Tensor]] = {}
        self.cos_sum: dict[int, float] = {}
        self.count = 0
        self.kept = 0

    def add(self, layers_x: list[torch.Tensor], layers_y: list[torch.Tensor]) -> None:
        """layers_x, layers_y: one [n, D] tensor per layer for the same n tokens."""
        n = layers_x[0].shape[0]
        take = max(0, min(n, self.max_tokens - self.kept))
        for i, (a, b) in enumerate(zip(layers_x, layers_y)):
            cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).sum()
            self.cos_sum[i] = self.cos_sum.get(i, 0.0) + float(cos)
            if take:
                self.x.setdefault(i, []).append(a[:take].float().cpu())
                self.y.setdefault(i, []).append(b[:take].float().cpu())
        self.count += n
        self.kept += take

    def result(self) -> dict[str, list[float]]:
        layers = sorted(self.cos_sum)
        cka = [linear_cka(torch.cat(self.x[i]), torch.cat(self.y[i])) for i in layers]
        cos = [self.cos_sum[i] / self.count for i in layers]
        return {"cka": cka, "cosine": cos, "cka_tokens": self.kept}
