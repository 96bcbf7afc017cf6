"""Online biased matrix factorisation for user-item affinity: river's ``BiasedMF``, bounded.

Each event becomes a target on a 1-5 scale (a rating's stars; purchase 5, click 4, view 3.5, skip 1;
impressions teach nothing here) and one SGD step of river's ``BiasedMF``. river keeps a bias and a
latent vector for every user and item it has ever seen; this head caps both and evicts the least
recently seen (their entries leave river's tables), so memory stays bounded on an endless stream.
The default learning rate (0.01 with L2) is the one that kept SGD stable on 1-5 targets here: river's
``FunkMF`` defaults overflowed to NaN on them (DESIGN §4).

Uncertainty is count-based: ``1 / sqrt(1 + n)`` where ``n`` is the smaller of the user's and the item's
number of updates — a pair the model has barely trained on is one it cannot yet score.

>>> from freshrec.events import Event
>>> head = MatrixFactorisationHead(seed=1)
>>> for user in ("u1", "u2"):
...     head.learn_one(Event(f"{user}-a", user, "a", "rating", 0, 5.0))
...     head.learn_one(Event(f"{user}-b", user, "b", "rating", 0, 1.0))
>>> head.rank("u3", ["b", "a"])
['a', 'b']
"""

from __future__ import annotations

import math
import pickle
import random
from collections import OrderedDict
from typing import Any, Final

import numpy as np
from river import optim, reco

from freshrec.events import Event
from streams.heads import Head

__all__ = ["IMPLICIT_TARGETS", "MatrixFactorisationHead"]

IMPLICIT_TARGETS: Final = {"purchase": 5.0, "click": 4.0, "view": 3.5, "skip": 1.0}
_POOL_SIZE: Final = 10_000


class MatrixFactorisationHead(Head):
    """User-item affinity by online biased MF; see the module docstring."""

    name = "mf"

    def __init__(
        self,
        *,
        n_factors: int = 16,
        learning_rate: float = 0.01,
        l2: float = 0.001,
        max_users: int = 200_000,
        max_items: int = 200_000,
        negatives: int = 0,
        uniform_negatives: bool = False,
        seed: int = 0,
    ) -> None:
        self.max_users = max_users
        self.max_items = max_items
        self.negatives = negatives
        self.uniform_negatives = uniform_negatives
        self._catalogue: list[str] = []  # items seen, for uniform negatives (evicted ones are skipped)
        self._rng = random.Random(seed)
        self._pool: list[str] = []  # recent item ids: sampling from it is popularity-proportional
        self._pool_at = 0
        self.touched: list[str] = []  # items whose factors the last learn_one changed
        self._model = reco.BiasedMF(
            n_factors=n_factors,
            bias_optimizer=optim.SGD(learning_rate),
            latent_optimizer=optim.SGD(learning_rate),
            l2_bias=l2,
            l2_latent=l2,
            seed=seed,
        )
        self._users: OrderedDict[str, int] = OrderedDict()  # id -> updates, least recent first
        self._items: OrderedDict[str, int] = OrderedDict()

    def learn_one(self, event: Event) -> None:
        target = event.value if event.type == "rating" else IMPLICIT_TARGETS.get(event.type)
        if target is None:
            return
        self._touch(self._users, event.user_id, self.max_users, user=True)
        self._touch(self._items, event.item_id, self.max_items, user=False)
        self.touched = [event.item_id]
        if not self.negatives:
            self._model.learn_one(event.user_id, event.item_id, float(target))
            return
        # Implicit feedback: the interaction is a positive (1), and `negatives` items drawn from the
        # recent stream (so by popularity) are negatives (0) for this user.
        self._model.learn_one(event.user_id, event.item_id, 1.0)
        pool = self._catalogue if self.uniform_negatives else self._pool
        for _ in range(self.negatives if pool else 0):
            negative = pool[self._rng.randrange(len(pool))]
            if negative != event.item_id and negative in self._items:
                self._model.learn_one(event.user_id, negative, 0.0)
                self.touched.append(negative)
        if self._items[event.item_id] == 1:  # first sight of this item (or since its eviction)
            self._catalogue.append(event.item_id)
            if len(self._catalogue) > 2 * self.max_items:  # drop evicted items: bounded memory
                self._catalogue = list(self._items)
        pool_size = min(_POOL_SIZE, 4 * self.max_items)
        if len(self._pool) < pool_size:
            self._pool.append(event.item_id)
        else:
            self._pool[self._pool_at] = event.item_id
            self._pool_at = (self._pool_at + 1) % pool_size

    def predict_one(self, user_id: str, item_id: str) -> float:
        # river creates entries for unknown ids on read (defaultdict); score them without learning them.
        model = self._model
        if user_id not in self._users or item_id not in self._items:
            bias = model.global_mean.get()
            if item_id in self._items:
                bias += model.i_biases[item_id]
            if user_id in self._users:
                bias += model.u_biases[user_id]
            return float(bias)
        return float(model.predict_one(user_id, item_id))

    def uncertainty_one(self, user_id: str, item_id: str) -> float:
        updates = min(self._users.get(user_id, 0), self._items.get(item_id, 0))
        return 1.0 / math.sqrt(1.0 + updates)

    @property
    def global_mean(self) -> float:
        return float(self._model.global_mean.get())

    def user_factors(self, user_id: str) -> tuple[np.ndarray, float] | None:
        """The user's latent vector and bias, or None for an unknown user (for vectorised scoring)."""
        if user_id not in self._users:
            return None
        return self._model.u_latents[user_id], float(self._model.u_biases[user_id])

    def item_factors(self, item_id: str) -> tuple[np.ndarray, float] | None:
        """The item's latent vector and bias, or None for an unknown item."""
        if item_id not in self._items:
            return None
        return self._model.i_latents[item_id], float(self._model.i_biases[item_id])

    @property
    def size(self) -> int:
        return len(self._users) + len(self._items) + len(self._catalogue) + len(self._pool)

    def state_dict(self) -> dict[str, Any]:
        # Everything the head holds (river's model, the id tables, the negative sampler and its RNG),
        # pickled at once: a snapshot that later learning cannot touch.
        return {"blob": pickle.dumps(self.__dict__)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(pickle.loads(state["blob"]))

    def _touch(self, table: OrderedDict[str, int], key: str, cap: int, *, user: bool) -> None:
        table[key] = table.pop(key, 0) + 1
        if len(table) > cap:
            evicted, _ = table.popitem(last=False)
            model = self._model
            biases, latents = (model.u_biases, model.u_latents) if user else (model.i_biases, model.i_latents)
            biases.pop(evicted, None)
            latents.pop(evicted, None)
