"""The effect-loss estimator (docs/method.md): GRU over the click history + embeddings of the
user and request features -> MMoE with K+1 task towers.

    l_ctrl = tower_0(x),  l_j^uplift = tower_j(x),  l_j^treat = l_j^uplift + l_ctrl
    Q_0 = exp(l_ctrl),    Q_j = exp(l_j^treat)        (log link: rewards are click counts)
    ΔQ_j = Q_0 - Q_j      (the predicted effect loss of recycling with strategy j)

Raw inputs, as served (batch first):
    user_features [B,3] int64 codes (any int64 >= 0: hashed into buckets)
    history [B,L] int64 item ids, most recent first, PAD_ID-padded, L <= 50 (vocabulary + OOV)
    request_features [B,4] float32: secs_since_prev (-1 initial), page, prev_exposures, prev_clicks
    cache_state [B,3K] float32: per cached list read by strategy j: age s, pages served, items left
        (-1 = absent). Multiplied by a constant 0 when the training logs had no cache state, so
        such a model ignores it.
    With list_origin, each present list also gets its origin, the session page it was computed
    for (request page - pages served). A list computed for a session's first page knows none of
    the session's clicks and loses more per page than one refreshed later in the session; which
    of the two a cache holds at a given depth depends on the policy that aged it (a recycling
    policy keeps first-page lists, a randomised log refreshes), so without the origin an
    estimator trained on randomised logs underestimates the loss of deep caches in deployment
    (docs/history.md, "Noise or shift: noise-free labels and the list origin").
Outputs: q [B,K+1] float32, delta_q [B,K] float32.
The module itself takes vocabulary indices for the history (see export.graft).
"""
from __future__ import annotations

import torch
from torch import nn

from ..specs import HISTORY_MAX

K = 3  # recycling strategies 1..K
CODE_BUCKETS = 101  # categorical codes are hashed: code mod CODE_BUCKETS
SECS_BUCKETS = 16  # floor(log2(1 + secs)), initial requests get their own bucket
COUNT_BUCKETS = 21


class EffectLossNet(nn.Module):
    def __init__(self, n_items: int, emb: int = 16, hidden: int = 32, n_experts: int = 4,
                 expert_dim: int = 32, k: int = K, use_cache_state: bool = True, list_origin: bool = False):
        super().__init__()
        self.k = k
        self.list_origin = bool(list_origin)
        self.register_buffer("cache_mask", torch.tensor(1.0 if use_cache_state else 0.0))
        # pages served from a cached list: 0 = absent, 1..COUNT_BUCKETS-1
        self.cache_pages = nn.ModuleList([nn.Embedding(COUNT_BUCKETS, 4) for _ in range(k)])
        if self.list_origin:  # origin page of a list: 0..COUNT_BUCKETS-2, COUNT_BUCKETS-1 = absent
            self.cache_origin = nn.ModuleList([nn.Embedding(COUNT_BUCKETS, 4) for _ in range(k)])
        self.item_emb = nn.Embedding(n_items + 2, emb, padding_idx=0)
        self.gru = nn.GRU(emb, hidden, batch_first=True)
        self.codes = nn.ModuleList([nn.Embedding(CODE_BUCKETS, 8) for _ in range(3)])
        self.secs = nn.Embedding(SECS_BUCKETS + 1, 8)
        self.page = nn.Embedding(COUNT_BUCKETS, 4)
        self.expo = nn.Embedding(COUNT_BUCKETS, 8)
        self.clicks = nn.Embedding(COUNT_BUCKETS, 8)
        d_in = hidden + 3 * 8 + 8 + 4 + 8 + 8 + 3 + k * (4 + 4) + (k * (4 + 1) if self.list_origin else 0)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, expert_dim),
                                                    nn.ReLU()) for _ in range(n_experts)])
        self.gates = nn.ModuleList([nn.Linear(d_in, n_experts) for _ in range(k + 1)])
        self.towers = nn.ModuleList([nn.Sequential(nn.Linear(expert_dim, 16), nn.ReLU(), nn.Linear(16, 1))
                                     for _ in range(k + 1)])

    def cache_features(self, cache_state: torch.Tensor) -> list[torch.Tensor]:
        cs = cache_state.reshape(-1, self.k, 3) * self.cache_mask
        present = (cs[:, :, 0] >= 0).float()
        age, pages, items = cs[:, :, 0].clamp(min=0.0), cs[:, :, 1].clamp(min=0.0), cs[:, :, 2].clamp(min=0.0)
        dense = torch.stack([present, torch.log1p(age) / 5.0, pages / 5.0, torch.log1p(items) / 5.0], dim=2)
        buckets = pages.clamp(0, COUNT_BUCKETS - 1).long()
        return [dense.reshape(-1, self.k * 4)] + [emb(buckets[:, j]) for j, emb in enumerate(self.cache_pages)]

    def origin_features(self, cache_state: torch.Tensor, page: torch.Tensor) -> list[torch.Tensor]:
        """The session page each present list was computed for (page [B] - pages served), as an
        embedding and a dense value per list; absent lists get their own bucket and 0."""
        cs = cache_state.reshape(-1, self.k, 3) * self.cache_mask
        present = cs[:, :, 0] >= 0
        origin = (page.unsqueeze(1) - cs[:, :, 1]).clamp(0, COUNT_BUCKETS - 2)
        buckets = torch.where(present, origin, torch.full_like(origin, COUNT_BUCKETS - 1)).long()
        dense = torch.where(present, origin / 5.0, torch.zeros_like(origin))
        return [dense] + [emb(buckets[:, j]) for j, emb in enumerate(self.cache_origin)]

    def features(self, user_features: torch.Tensor, history_idx: torch.Tensor, request_features: torch.Tensor,
                 cache_state: torch.Tensor):
        """-> [B, d_in]. history_idx [B,L] right-padded with 0 (most recent first)."""
        B = history_idx.shape[0]
        # fixed length HISTORY_MAX, then chronological order (oldest first, padding first) so
        # the GRU's last state follows the most recent click
        h = torch.cat([history_idx, torch.zeros(B, HISTORY_MAX, dtype=history_idx.dtype)], dim=1)
        h = torch.flip(h[:, :HISTORY_MAX], dims=[1])
        _, state = self.gru(self.item_emb(h))
        hist = state[0]
        codes = [emb(torch.remainder(user_features[:, i], CODE_BUCKETS)) for i, emb in enumerate(self.codes)]
        rf = request_features
        secs = rf[:, 0]
        secs_b = torch.where(secs < 0, torch.full_like(secs, SECS_BUCKETS),
                             torch.floor(torch.log2(1.0 + secs.clamp(min=0.0))).clamp(0, SECS_BUCKETS - 1))
        counts = rf[:, 1:4].clamp(0, COUNT_BUCKETS - 1).long()
        dense = torch.stack([torch.log1p(secs.clamp(min=0.0)) / 5.0, rf[:, 2] / 20.0, rf[:, 3] / 5.0], dim=1)
        origin = self.origin_features(cache_state, rf[:, 1].clamp(min=0.0)) if self.list_origin else []
        return torch.cat([hist, *codes, self.secs(secs_b.long()), self.page(counts[:, 0]),
                          self.expo(counts[:, 1]), self.clicks(counts[:, 2]), dense,
                          *self.cache_features(cache_state), *origin], dim=1)

    def logits(self, user_features, history_idx, request_features, cache_state) -> torch.Tensor:
        """[B, K+1]: column 0 = l_ctrl, column j = l_j^treat = l_ctrl + l_j^uplift."""
        x = self.features(user_features, history_idx, request_features, cache_state)
        ex = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, D]
        towers = []
        for gate, tower in zip(self.gates, self.towers):
            w = torch.softmax(gate(x), dim=-1).unsqueeze(-1)  # [B, E, 1]
            towers.append(tower((w * ex).sum(1)))
        l_ctrl = towers[0]
        l_treat = [l_ctrl + t for t in towers[1:]]
        return torch.cat([l_ctrl] + l_treat, dim=1)

    def forward(self, user_features, history_idx, request_features, cache_state):
        q = torch.exp(self.logits(user_features, history_idx, request_features, cache_state))
        return q, q[:, :1] - q[:, 1:]


class EnsembleNet(nn.Module):
    """Several EffectLossNets trained on the same log with different seeds; q is the mean of
    their q, so ΔQ is the mean of their ΔQ. Uplift learned from noisy clicks varies a lot from
    seed to seed; the mean ranks requests better than a typical member (docs/RESULTS.md,
    "The estimator's training seed, and an ensemble")."""

    def __init__(self, members: list[EffectLossNet]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.k = members[0].k

    def forward(self, user_features, history_idx, request_features, cache_state):
        q = torch.stack([m(user_features, history_idx, request_features, cache_state)[0] for m in self.members]).mean(0)
        return q, q[:, :1] - q[:, 1:]
