"""SASRec: a causal self-attention sequential recommender (Kang & McAuley, 2018), in torch.

Readable in one sitting, nanoGPT style: a config dataclass, pre-norm transformer blocks, shape
comments. ``B`` batch, ``T`` sequence length (``max_len``, histories left-padded with row 0), ``D``
embedding size, ``N`` rows of the item table.

Two choices that the streaming setting makes for us:

- **The item table is sparse** (``nn.Embedding(sparse=True)``, trained with ``SparseAdam``): a step
  changes only the rows it looked up, which is what lets :mod:`publishers` ship *sparse* deltas of the
  touched rows. Dense optimisers with momentum move every row that ever had a gradient.
- **Sampled softmax with shared negatives** rather than the full softmax: the full softmax's gradient
  touches every row every step (no sparse delta is then smaller than the model) and costs ~3x on this
  CPU (DESIGN.md §4: 19 s vs 56 s per ML-1M epoch). Each batch shares ``negatives`` uniform samples;
  uniform sampling needs no log-Q correction. Evaluation always ranks the full catalogue.

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

__all__ = ["SPARSE_TABLES", "Block", "SASRec", "SASRecConfig"]

# Parameters published as sparse deltas (rows); every other parameter is dense.
SPARSE_TABLES: tuple[str, ...] = ("item_emb.weight",)


@dataclass(frozen=True)
class SASRecConfig:
    max_len: int = 50  # items of history the model attends over
    dim: int = 64  # embedding and hidden size
    heads: int = 1  # attention heads (dim must divide by it)
    blocks: int = 2  # transformer blocks
    dropout: float = 0.2  # on embeddings, attention and feed-forward
    negatives: int = 1024  # shared uniform negatives per batch in the sampled softmax; 0: full softmax
    cosine: bool = False  # score by cosine similarity (L2-normalised vectors), as the HSTU repo does
    temperature: float = 1.0  # logits are divided by it (with cosine, ~0.05 is typical)

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


class SASRec(nn.Module):
    """Item table (row 0 = padding), learned positions, ``blocks`` causal blocks, a final norm."""

    def __init__(self, config: SASRecConfig, *, rows: int) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(rows, config.dim, padding_idx=0, sparse=True)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.blocks))
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
                self.item_emb.weight[rows] = fresh

    def grow(self, rows: int) -> None:
        """Enlarge the item table to ``rows`` (new rows zero), keeping every existing row."""
        old = self.item_emb
        if rows <= old.num_embeddings:
            return
        table = nn.Embedding(rows, self.config.dim, padding_idx=0, sparse=True)
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
        """
        c = self.config
        T, D = rows.shape[0], c.dim
        if self.training or not 0 < T <= c.max_len:
            raise ValueError(f"state() serves an eval-mode model 1..{c.max_len} items; got {T}")
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

    def loss(self, seq: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
        """Sampled softmax over [target, shared negatives] at every real position.

        ``seq`` (B, T) inputs, ``target`` (B, T) the next item at each position (0 = no target),
        ``negatives`` (S,) rows shared by the batch (a negative equal to the target is masked out),
        or ``None`` for the full softmax over every row.
        """
        h = self._out(self.hidden(seq))  # (B, T, D)
        real = target > 0  # (B, T)
        if negatives is None:  # full softmax over every row (padding excluded)
            every = torch.arange(self.rows, device=seq.device)  # a lookup keeps the gradient sparse
            logits = h[real] @ self.item_vectors(every).T / self.config.temperature  # (R, N)
            logits[:, 0] = float("-inf")
            return F.cross_entropy(logits, target[real])
        pos = (h * self.item_vectors(target)).sum(-1, keepdim=True)  # (B, T, 1)
        neg = h @ self.item_vectors(negatives).T  # (B, T, S)
        neg = neg.masked_fill(negatives.view(1, 1, -1) == target.unsqueeze(-1), float("-inf"))
        logits = torch.cat([pos, neg], dim=-1) / self.config.temperature  # (B, T, 1+S)
        losses = torch.logsumexp(logits, dim=-1) - logits[..., 0]  # (B, T)
        return losses[real].mean()
