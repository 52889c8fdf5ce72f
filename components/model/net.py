"""The fusion scorer: metapath channels × language-model text × (optional) item-ID factors.

For user u with binary history h_u, profile-text embedding p_u and feature channels f_c(u, i):

    s(u, i) = Σ_c g_c(u) f_c(u, i)                                  personalised metapath fusion
            + <X_i A, B [x̄_u ; p_u] + b>                            the seed's bilinear text term
            + <m_i P_i, Q^T h_u / sqrt(|h_u|)>                       item-ID factors (warm items only)
            + <v, X_i> + m_i β_i                                     text and ID item biases

with X_i the item's (fine-tuned) text embedding, x̄_u the normalised mean text embedding of the
history, g_c(u) = softplus(a_c + <w_c, [x̄_u ; p_u]>) a per-user weight for each channel (HERec's
personalised fusion, kept positive so a channel can only add evidence), and m_i = 1 for items with
training interactions, 0 otherwise: cold items are scored from text and KG channels alone, never
from an untrained ID vector. The ranking score is s; σ(s) is the probability form of the seed.

Inputs are plain tensors (history, profile, features) so the module exports to ONNX as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NetConfig:
    """Shape and switches of the scorer (saved with every checkpoint)."""

    n_items: int
    text_dim: int
    n_channels: int
    rank: int = 64  # width of the bilinear text term and the ID factors
    use_paths: bool = True  # ablation switch: metapath channels
    use_text: bool = True  # ablation switch: text term and text bias
    use_ids: bool = True  # ablation switch: item-ID factors and biases

    def to_dict(self) -> dict[str, object]:
        """Plain-dict form for JSON."""
        return asdict(self)


class FusionNet(nn.Module):
    """Scores every item for a batch of users; see the module docstring for the equation."""

    def __init__(self, cfg: NetConfig, item_text: torch.Tensor, warm: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        d, r, n, c = cfg.text_dim, cfg.rank, cfg.n_items, cfg.n_channels
        user_dim = 2 * d
        self.item_text: torch.Tensor
        self.warm: torch.Tensor
        self.register_buffer("item_text", item_text.float().clone())
        self.register_buffer("warm", warm.float().clone())

        def init(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=gen) * std)

        self.path_bias = nn.Parameter(torch.zeros(c))
        self.path_user = init(user_dim, c, std=0.01)
        self.text_item = init(d, r, std=d**-0.5)
        self.text_user = init(user_dim, r, std=user_dim**-0.5)
        self.text_user_bias = nn.Parameter(torch.zeros(r))
        self.text_bias = nn.Parameter(torch.zeros(d))
        self.id_item = init(n, r, std=0.01)
        self.id_user = init(n, r, std=0.01)
        self.id_bias = nn.Parameter(torch.zeros(n))

    def user_vector(self, history: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        """[normalised mean text of the history ; profile embedding], shape (B, 2·text_dim)."""
        mean = history @ self.item_text
        mean = mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return torch.cat([mean, profile], dim=1)

    def forward(
        self,
        history: torch.Tensor,
        profile: torch.Tensor,
        features: torch.Tensor,
        warm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores ``(B, n_items)`` from history ``(B, N)``, profile ``(B, D)``, features ``(B, C, N)``.

        ``warm`` overrides the stored warm-item mask (training uses it to drop items' IDs at random).
        """
        warm = self.warm if warm is None else warm
        user = self.user_vector(history, profile)
        scores = torch.zeros(history.shape[0], self.cfg.n_items, dtype=history.dtype)
        if self.cfg.use_paths and self.cfg.n_channels:
            gates = nn.functional.softplus(self.path_bias + user @ self.path_user)
            scores = scores + torch.einsum("bc,bcn->bn", gates, features)
        if self.cfg.use_text:
            items = self.item_text @ self.text_item
            users = user @ self.text_user + self.text_user_bias
            scores = scores + users @ items.T + (self.item_text @ self.text_bias)[None, :]
        if self.cfg.use_ids:
            size = history.sum(dim=1, keepdim=True).clamp_min(1.0).sqrt()
            users_id = (history @ self.id_user) / size
            items_id = self.id_item * warm[:, None]
            scores = scores + users_id @ items_id.T + (self.id_bias * warm)[None, :]
        return scores
