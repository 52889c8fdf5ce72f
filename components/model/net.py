"""The fusion scorer: metapath channels × language-model text × (optional) item-ID factors.

For user u with binary history h_u, profile-text embedding p_u and feature channels f_c(u, i):

    s(u, i) = Σ_c g_c(u) f_c(u, i)                                  personalised metapath fusion
            + <X_i A, B [x̄_u ; p_u] + b>                            the seed's bilinear text term
            + <m_i P_i, Q^T h_u / sqrt(|h_u|)>                       item-ID factors (warm items only)
            + <v, X_i> + m_i β_i                                     text and ID item biases
            + <e, a_i>                                               metadata bias (optional)

with X_i the item's (fine-tuned) text embedding, x̄_u the normalised mean text embedding of the
history, g_c(u) = softplus(a_c + <w_c, [x̄_u ; p_u]>) a per-user weight for each channel (HERec's
personalised fusion, kept positive so a channel can only add evidence; ``gates="language"`` replaces
<w_c, ·> by learned scales of the cosines between x̄_u, p_u and the embedding T_c of the channel's
verbalised metapath, so the language model decides which user a channel suits), and m_i = 1 for items with
training interactions, 0 otherwise: cold items are scored from text and KG channels alone, never
from an untrained ID vector (``text_to_id`` gives them X_i M in its place, M learned on the items
hidden by item dropout). a_i is the item's metadata one-hots (genre,
release year: what a new item has on arrival, so its prior is not a blank). The ranking score is s;
σ(s) is the probability form of the seed.

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
    text_to_id: bool = False  # cold items' ID factors from their text through a learned map
    text_warm: bool = True  # text terms score warm items too (False: only items without interactions)
    n_attributes: int = 0  # item metadata one-hots (genre, year) with a learned bias each; 0: none
    gates: str = "learned"  # learned | language | both (see MetarecConfig.gates)

    def to_dict(self) -> dict[str, object]:
        """Plain-dict form for JSON."""
        return asdict(self)


class FusionNet(nn.Module):
    """Scores every item for a batch of users; see the module docstring for the equation."""

    def __init__(
        self,
        cfg: NetConfig,
        item_text: torch.Tensor,
        warm: torch.Tensor,
        seed: int = 0,
        channel_text: torch.Tensor | None = None,
        item_attributes: torch.Tensor | None = None,
    ) -> None:
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
        if cfg.gates in ("learned", "both"):
            self.path_user = init(user_dim, c, std=0.01)
        if cfg.gates in ("language", "both"):
            if channel_text is None and (c == 0 or not cfg.use_paths):
                channel_text = torch.zeros(c, d)  # no channel to gate: nothing to match
            if channel_text is None or tuple(channel_text.shape) != (c, d):
                got = None if channel_text is None else tuple(channel_text.shape)
                raise ValueError(f"gates={cfg.gates!r} needs channel_text of shape ({c}, {d}), got {got}")
            self.channel_text: torch.Tensor
            self.register_buffer("channel_text", channel_text.float().clone())
            # One scale per channel for each half of the user vector (history text, profile text).
            self.gate_history = nn.Parameter(torch.zeros(c))
            self.gate_profile = nn.Parameter(torch.zeros(c))
        elif cfg.gates != "learned":
            raise ValueError(f"gates must be learned, language or both, got {cfg.gates!r}")
        self.text_item = init(d, r, std=d**-0.5)
        self.text_user = init(user_dim, r, std=user_dim**-0.5)
        self.text_user_bias = nn.Parameter(torch.zeros(r))
        self.text_bias = nn.Parameter(torch.zeros(d))
        self.id_item = init(n, r, std=0.01)
        self.id_user = init(n, r, std=0.01)
        self.id_bias = nn.Parameter(torch.zeros(n))
        if cfg.text_to_id:
            self.id_from_text = init(d, r, std=0.01)
        if cfg.n_attributes:
            if item_attributes is None or tuple(item_attributes.shape) != (n, cfg.n_attributes):
                got = None if item_attributes is None else tuple(item_attributes.shape)
                raise ValueError(
                    f"n_attributes={cfg.n_attributes} needs item_attributes of shape "
                    f"({n}, {cfg.n_attributes}), got {got}"
                )
            self.item_attributes: torch.Tensor
            self.register_buffer("item_attributes", item_attributes.float().clone())
            self.attribute_bias = nn.Parameter(torch.zeros(cfg.n_attributes))

    def user_vector(self, history: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        """[normalised mean text of the history ; profile embedding], shape (B, 2·text_dim)."""
        mean = history @ self.item_text
        mean = mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return torch.cat([mean, profile], dim=1)

    def gate_logits(self, user: torch.Tensor) -> torch.Tensor:
        """Per-user channel logits ``(B, C)``: learned from the user vector, matched by language, or both."""
        logits = self.path_bias.expand(user.shape[0], -1)
        if self.cfg.gates in ("learned", "both"):
            logits = logits + user @ self.path_user
        if self.cfg.gates in ("language", "both"):
            d = self.cfg.text_dim
            # Cosines: the history half is unit-normalised; profiles and channel texts are unit rows.
            logits = logits + (user[:, :d] @ self.channel_text.T) * self.gate_history
            logits = logits + (user[:, d:] @ self.channel_text.T) * self.gate_profile
        return logits

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
            gates = nn.functional.softplus(self.gate_logits(user))
            scores = scores + torch.einsum("bc,bcn->bn", gates, features)
        if self.cfg.use_text:
            items = self.item_text @ self.text_item
            users = user @ self.text_user + self.text_user_bias
            text = users @ items.T + (self.item_text @ self.text_bias)[None, :]
            scores = scores + (text if self.cfg.text_warm else text * (1.0 - warm)[None, :])
        if self.cfg.n_attributes:
            scores = scores + (self.item_attributes @ self.attribute_bias)[None, :]
        if self.cfg.use_ids:
            size = history.sum(dim=1, keepdim=True).clamp_min(1.0).sqrt()
            users_id = (history @ self.id_user) / size
            items_id = self.id_item * warm[:, None]
            if self.cfg.text_to_id:
                items_id = items_id + (self.item_text @ self.id_from_text) * (1.0 - warm)[:, None]
            scores = scores + users_id @ items_id.T + (self.id_bias * warm)[None, :]
        return scores
