"""SASRec: a causal self-attention sequential recommender (Kang & McAuley, 2018), in torch.

Readable in one sitting, nanoGPT style: a config dataclass, pre-norm transformer blocks, shape
comments. ``B`` batch, ``T`` sequence length (``max_len``, histories left-padded with row 0), ``D``
embedding size, ``N`` rows of the item table.

Choices the streaming setting makes for us:

- **The item table is sparse** (``nn.Embedding(sparse=True)``, trained with ``SparseAdam``): a step
  changes only the rows it looked up, which is what lets :mod:`publishers` ship *sparse* deltas of the
  touched rows. Dense optimisers with momentum move every row that ever had a gradient.
- **The loss follows the catalogue's size** (``loss="auto"``): the full softmax (cross-entropy over
  every item) where the catalogue has at most ``full_softmax_max_items`` items (ml-100k HR@10 0.169
  against 0.155 sampled, 3 seeds, docs/benchmarks.md); a sampled softmax over ``negatives``
  shared negatives, with the log-Q correction, where the full one would cost too much per step.
  The full softmax's gradient moves every row each step, so the fine-tune normalises it over the
  window's items only (``TrainConfig.softmax_over``): its sparse delta stays the window's rows.
- **Two blocks**: SASRec's (softmax attention and a feed-forward) and HSTU's (Zhai et al., 2024:
  pointwise SiLU attention with a relative position bias, gated by a fourth projection ``u``, no
  feed-forward), chosen by ``block``.

Evaluation always ranks the full catalogue.

The output layer is tied to the input item table (as in SASRec): a user's state is the hidden vector
at the last position, and an item's score is its dot product with that item's row.

>>> import torch
>>> model = SASRec(SASRecConfig(max_len=8, dim=16, blocks=1), rows=10)
>>> seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])  # one left-padded history
>>> model.user_vectors(seq).shape, model.score_all(seq).shape
(torch.Size([1, 16]), torch.Size([1, 10]))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BLOCKS", "LOSSES", "SPARSE_TABLES", "Block", "HSTUBlock", "SASRec", "SASRecConfig"]

# Parameters published as sparse deltas (rows); every other parameter is dense.
SPARSE_TABLES: tuple[str, ...] = ("item_emb.weight",)
BLOCKS: tuple[str, ...] = ("sasrec", "hstu")
LOSSES: tuple[str, ...] = ("auto", "full", "sampled")


@dataclass(frozen=True)
class SASRecConfig:
    max_len: int = 50  # items of history the model attends over
    dim: int = 64  # embedding and hidden size
    heads: int = 1  # attention heads (dim must divide by it)
    blocks: int = 2  # transformer blocks
    dropout: float = 0.2  # on embeddings, attention and feed-forward
    negatives: int = 1024  # shared negatives per batch in the sampled softmax; 0: always the full softmax
    cosine: bool = False  # score by cosine similarity (L2-normalised vectors), as the HSTU repo does
    temperature: float = 1.0  # logits are divided by it (with cosine, ~0.05 is typical)
    block: str = "sasrec"  # "sasrec" (softmax attention + feed-forward) or "hstu" (pointwise SiLU attention)
    loss: str = "auto"  # "full" softmax, "sampled" softmax, or "auto": full up to full_softmax_max_items
    full_softmax_max_items: int = 20_000  # "auto" takes the full softmax up to this many items
    sample_alpha: float = 0.0  # negatives drawn ∝ count^alpha (0: uniform), log-Q corrected

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"block={self.block!r}: use one of {', '.join(BLOCKS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: use one of {', '.join(LOSSES)}")

    def full_softmax(self, items: int) -> bool:
        """Whether training over a catalogue of ``items`` items uses the full softmax."""
        if self.negatives <= 0 or self.loss == "full":
            return True
        return self.loss == "auto" and items <= self.full_softmax_max_items

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SASRecConfig:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


class Block(nn.Module):
    """Pre-norm causal self-attention and a position-wise feed-forward, each with a residual."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        if config.dim % config.heads:
            raise ValueError(f"dim={config.dim} is not divisible by heads={config.heads}")
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.norm2 = nn.LayerNorm(config.dim)
        self.ff = nn.Sequential(
            nn.Linear(config.dim, config.dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.dim, config.dim),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(D, dim=2)  # 3 x (B, T, D)
        q, k, v = (
            t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v)
        )  # (B, H, T, D/H)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, H, T, D/H)
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        out: torch.Tensor = x + self.dropout(self.ff(self.norm2(x)))
        return out


class HSTUBlock(nn.Module):
    """HSTU's block: pointwise aggregated attention, gated, with a relative position bias.

    ``u, v, q, k = SiLU(W · norm(x))``; the attention weights are ``SiLU(q·k + bias[i - j]) / max_len``
    over the visible positions (no softmax: weights do not compete, so how *much* history agrees is
    kept, which suits preference intensity); the output ``x + W_o(norm(attention · v) * u)``. No
    feed-forward: the gate ``u`` is the block's non-linearity. Dividing by the constant ``max_len``
    (not by the window's length) keeps a short unpadded history's state equal to its padded one.
    The reference also buckets time gaps into the bias; training windows here carry no timestamps,
    so only the relative position is used.
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        if config.dim % config.heads:
            raise ValueError(f"dim={config.dim} is not divisible by heads={config.heads}")
        self.heads = config.heads
        self.max_len = config.max_len
        self.norm_in = nn.LayerNorm(config.dim)
        self.uvqk = nn.Linear(config.dim, 4 * config.dim)
        self.norm_attn = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.dim)
        self.rel_bias = nn.Parameter(torch.zeros(config.max_len))  # by distance i - j ≥ 0
        self.dropout = nn.Dropout(config.dropout)
        self.attn_dropout = nn.Dropout(config.dropout)
        nn.init.normal_(self.rel_bias, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.heads
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).split(D, dim=2)  # 4 x (B, T, D)
        v, q, k = (t.view(B, T, H, D // H).transpose(1, 2) for t in (v, q, k))  # (B, H, T, D/H)
        at = torch.arange(T, device=x.device)
        distance = (at.view(-1, 1) - at.view(1, -1)).clamp(min=0)  # (T, T)
        weights = F.silu(q @ k.transpose(-2, -1) + self.rel_bias[distance]) / self.max_len  # (B, H, T, T)
        weights = self.attn_dropout(weights * mask)  # mask (B, 1, T, T): invisible positions weigh 0
        y = (weights @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        out: torch.Tensor = x + self.dropout(self.out(self.norm_attn(y) * u))
        return out


class SASRec(nn.Module):
    """Item table (row 0 = padding), learned positions, ``blocks`` causal blocks, a final norm."""

    def __init__(self, config: SASRecConfig, *, rows: int) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(rows, config.dim, padding_idx=0, sparse=True)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        kind = HSTUBlock if config.block == "hstu" else Block
        self.blocks = nn.ModuleList(kind(config) for _ in range(config.blocks))
        self.norm = nn.LayerNorm(config.dim)
        self.dropout = nn.Dropout(config.dropout)
        with torch.no_grad():
            self.item_emb.weight.zero_()
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    @property
    def rows(self) -> int:
        return int(self.item_emb.num_embeddings)

    def init_rows(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """(Re)initialise the rows of new or evicted items; unused rows stay zero."""
        if rows.numel():
            with torch.no_grad():
                fresh = torch.randn(len(rows), self.config.dim, generator=generator) / math.sqrt(
                    self.config.dim
                )
                weight = self.item_emb.weight
                weight[rows.to(weight.device)] = fresh.to(weight.device)

    def grow(self, rows: int) -> None:
        """Enlarge the item table to ``rows`` (new rows zero), keeping every existing row."""
        old = self.item_emb
        if rows <= old.num_embeddings:
            return
        table = nn.Embedding(rows, self.config.dim, padding_idx=0, sparse=True, device=old.weight.device)
        with torch.no_grad():
            table.weight.zero_()
            table.weight[: old.num_embeddings] = old.weight
        self.item_emb = table

    def hidden(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states of a batch of left-padded histories ``seq`` (B, T) → (B, T, D).

        ``T`` may be shorter than ``max_len``: the window is then the *last* T positions, so a short
        history without its padding gives the same states as padded to ``max_len`` (padding is
        masked out of attention), for a fraction of the work (serving uses this).
        """
        T = seq.shape[1]
        positions = torch.arange(self.config.max_len - T, self.config.max_len, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.config.dim) + self.pos_emb(positions)  # (B, T, D)
        x = self.dropout(x) * (seq > 0).unsqueeze(-1)  # padding contributes nothing
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()  # (T, T)
        # A position sees earlier real items and always itself (so padded rows never see nothing).
        mask = (causal & (seq > 0).unsqueeze(1)) | torch.eye(T, dtype=torch.bool, device=seq.device)
        mask = mask.unsqueeze(1)  # (B, 1, T, T)
        if self.config.block == "hstu":  # pointwise attention: padding must weigh nothing, even to itself
            mask = mask & (seq > 0).view(-1, 1, 1, T)
        for block in self.blocks:
            x = block(x, mask)
        out: torch.Tensor = self.norm(x)
        return out

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=-1) if self.config.cosine else h

    def user_vectors(self, seq: torch.Tensor) -> torch.Tensor:
        """The state after each history: the last position's hidden vector, (B, T) → (B, D)."""
        return self._out(self.hidden(seq)[:, -1, :])

    def state(self, rows: torch.Tensor) -> torch.Tensor:
        """The state after one unpadded history ``rows`` (T,), oldest first → (D,), for serving.

        The arithmetic of ``user_vectors(rows.view(1, -1))[0]`` in eval mode (a test holds them
        equal), without what one request does not need: module calls (per-op dispatch was most of
        the 0.4 ms a state took), padding masks, and all but the last position in the last block.
        The HSTU block takes the batched path on the unpadded history (no padding to mask).
        """
        c = self.config
        T, D = rows.shape[0], c.dim
        if self.training or not 0 < T <= c.max_len:
            raise ValueError(f"state() serves an eval-mode model 1..{c.max_len} items; got {T}")
        if c.block == "hstu":
            return self.user_vectors(rows.view(1, -1))[0]
        x = F.embedding(rows, self.item_emb.weight) * math.sqrt(D) + self.pos_emb.weight[c.max_len - T :]
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
        last = len(self.blocks) - 1
        blocks = cast(list[Block], list(self.blocks))
        for depth, block in enumerate(blocks):
            H = block.heads
            h = F.layer_norm(x, (D,), block.norm1.weight, block.norm1.bias)
            q, k, v = F.linear(h, block.qkv.weight, block.qkv.bias).split(D, dim=1)  # 3 x (T, D)
            if depth == last:  # only the last position's output is read
                q, x, mask = q[-1:], x[-1:], None
            else:
                mask = causal
            q, k, v = (t.view(-1, H, D // H).transpose(0, 1) for t in (q, k, v))  # (H, T or 1, D/H)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1).reshape(-1, D)
            x = x + F.linear(y, block.proj.weight, block.proj.bias)
            ff1, ff2 = cast(nn.Linear, block.ff[0]), cast(nn.Linear, block.ff[3])
            h = F.layer_norm(x, (D,), block.norm2.weight, block.norm2.bias)
            x = x + F.linear(F.gelu(F.linear(h, ff1.weight, ff1.bias)), ff2.weight, ff2.bias)
        return self._out(F.layer_norm(x[-1], (D,), self.norm.weight, self.norm.bias))

    def item_vectors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Output vectors of ``rows`` (default: every row), (..., D): the tied item table."""
        table = self.item_emb.weight if rows is None else self.item_emb(rows)
        return self._out(table)

    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores of every row of the item table, (B, T) → (B, N)."""
        return self.user_vectors(seq) @ self.item_vectors().T / self.config.temperature

    def loss(
        self,
        seq: torch.Tensor,
        target: torch.Tensor,
        negatives: torch.Tensor | None,
        log_q: torch.Tensor | None = None,
        *,
        used: int | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of the next item at every real position: full, or a sampled softmax.

        ``seq`` (B, T) inputs, ``target`` (B, T) the next item at each position (0 = no target).
        ``negatives=None``: the full softmax over rows 1..``used`` (default: every row but padding;
        spare rows that hold no item yet stay out of it and are not moved). Otherwise
        ``negatives`` (S,) rows shared by the batch, drawn with probabilities ``exp(log_q)`` (S,)
        (``None``: uniform over the table). Each negative's logit is corrected by ``- log(S q)``
        (the log-Q correction): ``Σ_j exp(logit_j) / (S q_j)`` estimates the sum over the whole
        catalogue without bias, so the sampled loss aims at the full one, and frequently drawn
        (popular) items are not over-penalised. A negative equal to the target is masked out.
        """
        h = self._out(self.hidden(seq))  # (B, T, D)
        real = target > 0  # (B, T)
        if negatives is None:  # full softmax over the used rows (padding excluded)
            end = self.rows if used is None else used + 1
            every = torch.arange(end, device=seq.device)  # a lookup keeps the gradient sparse
            logits = h[real] @ self.item_vectors(every).T  # (R, N)
            if self.config.temperature != 1.0:
                logits = logits / self.config.temperature
            logits[:, 0] = float("-inf")
            return F.cross_entropy(logits, target[real])
        S = negatives.shape[0]
        if log_q is None:
            log_q = torch.full((S,), -math.log(max(self.rows - 1, 1)), device=seq.device)
        h = h[real]  # (R, D): only real positions cost anything
        target = target[real]  # (R,)
        pos = (h * self.item_vectors(target)).sum(-1, keepdim=True) / self.config.temperature  # (R, 1)
        neg = h @ self.item_vectors(negatives).T / self.config.temperature - (log_q + math.log(S))  # (R, S)
        neg = neg.masked_fill(negatives.view(1, -1) == target.view(-1, 1), float("-inf"))
        logits = torch.cat([pos, neg], dim=-1)  # (R, 1+S)
        return (torch.logsumexp(logits, dim=-1) - logits[:, 0]).mean()
