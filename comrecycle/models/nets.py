"""PyTorch definitions of the four cascade stages.

Every stage takes the request context as *vocabulary indices* (see vocab.py: 0 = padding,
1 = out-of-vocabulary / cold start, 2.. = known ids) and returns its top-k:
    items [B, K] int64 (external ids), scores [B, K] float32 (-inf where fewer than K exist).
Shapes: user_idx [B,1], user_features [B,3], history_idx [B,H], request_features [B,4];
retrieval also exclude_idx [B,E]; the others cand_ids [B,L] (raw ids, -1 = pad) and cand_idx [B,L].

Costs are deliberately production-shaped: ranking (target attention over the click history
for every candidate, then a deep MLP) dominates; retrieval is one user tower and a dot
product with the catalogue; pre-ranking a small MLP; re-ranking one self-attention layer.
"""
from __future__ import annotations

import torch
from torch import nn

from ..specs import N_AGES, N_COUNTRIES, N_GENDERS

NEG_INF = float("-inf")


def request_feature_transform(rf: torch.Tensor) -> torch.Tensor:
    """[B,4] raw (secs_since_prev, page, prev_exposures, prev_clicks) -> [B,5] scaled."""
    secs = rf[:, 0:1]
    initial = (secs < 0).float()
    return torch.cat([torch.log1p(secs.clamp(min=0.0)) / 5.0, initial,
                      rf[:, 1:2].clamp(0.0, 50.0) / 10.0, rf[:, 2:3].clamp(0.0, 20.0) / 20.0,
                      rf[:, 3:4].clamp(0.0, 20.0) / 5.0], dim=1)


class ItemEncoder(nn.Module):
    """Item index -> id embedding + category embedding (the catalogue's item table is a
    constant buffer), so items with few clicks still get a sensible vector. OOV / padding
    rows map to an 'unknown' category."""

    def __init__(self, item_category: torch.Tensor, dim: int):
        super().__init__()
        n = item_category.numel()
        n_cat = int(item_category.max().item()) + 2 if n else 1
        table = torch.cat([torch.full((2,), n_cat - 1, dtype=torch.long), item_category.long()])
        self.register_buffer("category_of", table)
        self.id_emb = nn.Embedding(n + 2, dim, padding_idx=0)
        nn.init.normal_(self.id_emb.weight, std=0.01)
        self.cat_emb = nn.Embedding(n_cat, dim)
        self.embedding_dim = dim

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.id_emb(idx) + self.cat_emb(self.category_of[idx])

    def table(self) -> torch.Tensor:
        """[N+2, E] every item's vector."""
        return self.id_emb.weight + self.cat_emb(self.category_of)


class UserTower(nn.Module):
    """Demographics + user-id embedding (OOV for cold start) + pooled click history -> [B, out]."""

    def __init__(self, n_users: int, item_emb: ItemEncoder, dim: int, out: int,
                 use_request: bool = False):
        super().__init__()
        self.item_emb = item_emb
        self.user_emb = nn.Embedding(n_users + 2, dim)
        # +1 bucket: codes out of the known range mean "unknown"
        self.gender = nn.Embedding(N_GENDERS + 1, 8)
        self.age = nn.Embedding(N_AGES + 1, 8)
        self.country = nn.Embedding(N_COUNTRIES + 1, 8)
        self.use_request = use_request
        in_dim = dim + 24 + 2 * item_emb.embedding_dim + (5 if use_request else 0)
        self.mlp = nn.Sequential(nn.Linear(in_dim, 2 * out), nn.ReLU(), nn.Linear(2 * out, out))

    def forward(self, user_idx, user_features, history_idx, request_features=None):
        uf = user_features
        g = self.gender(uf[:, 0].clamp(0, N_GENDERS))
        a = self.age(uf[:, 1].clamp(0, N_AGES))
        c = self.country(uf[:, 2].clamp(0, N_COUNTRIES))
        h = self.item_emb(history_idx)  # [B,H,E]
        mask = (history_idx > 0).float().unsqueeze(-1)
        mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        # the most recent clicks matter most for in-session intent
        recent = (h[:, :3] * mask[:, :3]).sum(1) / mask[:, :3].sum(1).clamp(min=1.0)
        parts = [self.user_emb(user_idx[:, 0]), g, a, c, mean, recent]
        if self.use_request:
            parts.append(request_feature_transform(request_features))
        return self.mlp(torch.cat(parts, dim=1))


def _topk_with_padding(scores: torch.Tensor, ids: torch.Tensor, k: int):
    """Top-k of [B,L] scores even when L < k: K columns of -inf are appended (cheap: only
    scores are padded, not the model's work)."""
    B = scores.shape[0]
    pad_s = torch.full((B, k), NEG_INF, dtype=scores.dtype)
    pad_i = torch.full((B, k), -1, dtype=ids.dtype)
    s = torch.cat([scores, pad_s.to(scores.device)], dim=1)
    i = torch.cat([ids, pad_i.to(ids.device)], dim=1)
    top_s, pos = torch.topk(s, k, dim=1)
    return torch.gather(i, 1, pos), top_s


class Retrieval(nn.Module):
    """Two-tower retrieval over the whole catalogue, minus the session's exposed items."""

    def __init__(self, n_users: int, item_ids: torch.Tensor, item_category: torch.Tensor, dim: int,
                 top_k: int):
        super().__init__()
        n = item_ids.numel()
        self.top_k = top_k
        self.item_emb = ItemEncoder(item_category, dim)
        self.item_bias = nn.Embedding(n + 2, 1)
        self.user = UserTower(n_users, self.item_emb, dim, dim)
        self.register_buffer("id_table", torch.cat([torch.tensor([-1, -1]), item_ids.long()]))

    def user_vector(self, user_idx, user_features, history_idx, request_features):
        return self.user(user_idx, user_features, history_idx)

    def all_scores(self, u):
        return u @ self.item_emb.table().T + self.item_bias.weight.T  # [B, N+2]

    def forward(self, user_idx, user_features, history_idx, request_features, exclude_idx):
        u = self.user_vector(user_idx, user_features, history_idx, request_features)
        s = self.all_scores(u)
        s = torch.scatter(s, 1, exclude_idx, torch.full_like(exclude_idx, 0, dtype=s.dtype) + NEG_INF)
        s = s[:, 2:]  # padding and OOV rows are never retrieved
        top_s, pos = torch.topk(s, self.top_k, dim=1)
        return self.id_table[pos + 2], top_s


class CandidateScorer(nn.Module):
    """Base for the stages that score a candidate list: masks padding, returns the top-k."""

    top_k: int

    def score(self, user_idx, user_features, history_idx, request_features, cand_idx):
        raise NotImplementedError

    def forward(self, user_idx, user_features, history_idx, request_features, cand_ids, cand_idx):
        s = self.score(user_idx, user_features, history_idx, request_features, cand_idx)
        s = torch.where(cand_idx > 0, s, torch.full_like(s, NEG_INF))
        return _topk_with_padding(s, cand_ids, self.top_k)


class PreRank(CandidateScorer):
    """Light pre-ranking: a small user tower and a small MLP per candidate."""

    def __init__(self, n_users: int, item_category: torch.Tensor, dim: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        d = max(dim // 2, 8)
        self.item_emb = ItemEncoder(item_category, d)
        self.item_bias = nn.Embedding(item_category.numel() + 2, 1)
        self.user = UserTower(n_users, self.item_emb, d, d)
        self.mlp = nn.Sequential(nn.Linear(3 * d, 32), nn.ReLU(), nn.Linear(32, 1))

    def score(self, user_idx, user_features, history_idx, request_features, cand_idx):
        u = self.user(user_idx, user_features, history_idx)  # [B,d]
        v = self.item_emb(cand_idx)  # [B,L,d]
        ue = u.unsqueeze(1).expand_as(v)
        return self.mlp(torch.cat([ue, v, ue * v], dim=-1)).squeeze(-1) + self.item_bias(cand_idx).squeeze(-1)


class Rank(CandidateScorer):
    """The heavy ranker: DIN-style target attention of every candidate over the click
    history (with recency embeddings), real-time request features, and a deep MLP."""

    def __init__(self, n_users: int, item_category: torch.Tensor, dim: int, top_k: int,
                 hidden: tuple[int, ...] = (256, 128, 64), att_hidden: int = 32, window: int = 20):
        super().__init__()
        self.top_k = top_k
        self.item_emb = ItemEncoder(item_category, dim)
        self.item_bias = nn.Embedding(item_category.numel() + 2, 1)
        self.window = window  # target attention over the most recent `window` clicks
        self.recency = nn.Embedding(window, dim)
        self.user = UserTower(n_users, self.item_emb, dim, dim, use_request=True)
        self.att = nn.Sequential(nn.Linear(4 * dim, att_hidden), nn.ReLU(), nn.Linear(att_hidden, 1))
        layers, d_in = [], 4 * dim + 5
        for h in hidden:
            layers += [nn.Linear(d_in, h), nn.ReLU()]
            d_in = h
        self.mlp = nn.Sequential(*layers, nn.Linear(d_in, 1))

    def score(self, user_idx, user_features, history_idx, request_features, cand_idx):
        B, L = cand_idx.shape
        recent = history_idx[:, :self.window]
        H = recent.shape[1]
        q = self.item_emb(cand_idx)  # [B,L,E]
        k = self.item_emb(recent) + self.recency.weight[:H].unsqueeze(0)  # [B,H,E]
        qe = q.unsqueeze(2).expand(B, L, H, q.shape[-1])
        ke = k.unsqueeze(1).expand(B, L, H, k.shape[-1])
        a = self.att(torch.cat([qe, ke, qe * ke, qe - ke], dim=-1)).squeeze(-1)  # [B,L,H]
        hmask = (recent > 0).unsqueeze(1)
        a = torch.where(hmask, a, torch.full_like(a, -1e4))
        w = torch.softmax(a, dim=-1) * hmask.float()
        pooled = torch.einsum("blh,bhe->ble", w, k)
        u = self.user(user_idx, user_features, history_idx, request_features).unsqueeze(1).expand_as(q)
        rf = request_feature_transform(request_features).unsqueeze(1).expand(B, L, 5)
        return self.mlp(torch.cat([q, pooled, u, q * u, rf], dim=-1)).squeeze(-1) + self.item_bias(cand_idx).squeeze(-1)


class ReRank(CandidateScorer):
    """List-context re-ranking: one self-attention layer over the candidate list (so each
    item is scored knowing its neighbours), conditioned on the user and the session."""

    def __init__(self, n_users: int, item_category: torch.Tensor, dim: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.item_emb = ItemEncoder(item_category, dim)
        self.item_bias = nn.Embedding(item_category.numel() + 2, 1)
        self.user = UserTower(n_users, self.item_emb, dim, dim, use_request=True)
        self.inp = nn.Linear(3 * dim, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, 1))
        self.scale = dim ** -0.5

    def score(self, user_idx, user_features, history_idx, request_features, cand_idx):
        v = self.item_emb(cand_idx)
        u = self.user(user_idx, user_features, history_idx, request_features).unsqueeze(1).expand_as(v)
        x = self.inp(torch.cat([v, u, v * u], dim=-1))  # [B,L,E]
        q, k, val = self.qkv(x).chunk(3, dim=-1)
        att = torch.einsum("ble,bme->blm", q, k) * self.scale
        valid = (cand_idx > 0).unsqueeze(1)  # keys that exist
        att = torch.where(valid, att, torch.full_like(att, -1e4))
        ctx = torch.einsum("blm,bme->ble", torch.softmax(att, dim=-1), val)
        return self.out(torch.cat([x, ctx], dim=-1)).squeeze(-1) + self.item_bias(cand_idx).squeeze(-1)
