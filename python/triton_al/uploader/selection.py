"""Which queued items go when a group's budget binds (issue 15).

Without limits every item goes anyway, first in first out. When a group has a rate limit
or budget and more items due than its allowance, `--selection` decides which go first:

- `fifo` (default): the oldest first (the behaviour before this setting);
- `uncertainty`: the lowest scores first (the step's scores: lower = less confident);
- `diverse`: cluster, then send each cluster's representative. Uncertainty-weighted
  k-means over a small grey thumbnail of each image (each item weighted by 1 - score),
  as many clusters as the group's budget, and from each cluster the item nearest its
  centre; the most uncertain of those go first. Candidates are the group's `pool` most
  uncertain due items (bounded cost). The clusters are planned for the whole budget (the
  largest allowance seen for the group) and the plan is sent batch by batch; a new plan
  is made when too few of its items are still due. Assets that are not decodable images
  get no thumbnail: they are ranked by uncertainty after the images.

  When the model stores its embedding with each flagged item (`QueuedItem.embedding`),
  the clusters are of the embeddings instead of the thumbnails: the candidates whose
  embedding is of the model (name and version) and dimension most of them have are
  clustered; the others (another model version's embeddings: a redeploy; no embedding) are
  ranked by uncertainty after them. Thumbnails are used only when no candidate has an
  embedding: embedding and thumbnail rows are never clustered together. `choose` treats
  both alike (`features`: rows centred and scaled to unit length).

  (Before, `diverse` was a greedy uncertainty-weighted k-center, `pick_kcenter`: it
  favoured outliers, and from a cold start it beat random by only 0.5 points in the
  simulation; `benchmarks/RESULTS.md`, "Selection under a budget".)

Selection only applies to the uploader's own `--rate-limit` budgets (not to fleet budgets
kept in `--budget-ledger`), and only when a group has more items due than its allowance.

Pure functions (`pick_uncertain`, `pick_clustered`, `kmeans`, `thumbnail`) and a small
`Selector` the uploader asks for the ids to send; the simulation
(`triton_al.loop.simulation`, strategy `diverse`) calls the same `choose`.
"""

from __future__ import annotations

import io
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from triton_al.uploader.near_duplicates import checked_embedding

log = logging.getLogger(__name__)

SELECTIONS = ("fifo", "uncertainty", "diverse")
DEFAULT_POOL = 2000
THUMB_SIDE = 12  # 12x12 grey thumbnail -> 144 values


def parse_selection(value: str | None) -> str:
    """The strategy name; ValueError naming the choices otherwise."""
    v = "fifo" if value is None else str(value).strip().lower()
    if v not in SELECTIONS:
        raise ValueError(f"unknown selection {value!r}: expected one of {', '.join(SELECTIONS)}")
    return v


def _weights(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Uncertainty weight 1 - score, clipped to [0.01, 1] (a NaN score counts as 0.5)."""
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), 0.5, s)
    return np.clip(1.0 - s, 0.01, 1.0)


def pick_uncertain(scores: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest scores (ties: the earlier index first; NaN last)."""
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), np.inf, s)
    return np.argsort(s, kind="stable")[: max(0, int(k))]


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit length (brightness and contrast do not count)."""
    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    x = x - x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-6)


def pick_kcenter(features: np.ndarray, scores: Sequence[float] | np.ndarray, k: int,
                 sent: np.ndarray | None = None) -> np.ndarray:
    """Greedy uncertainty-weighted k-center: indices of k rows of `features` (already
    normalised feature vectors), the most uncertain first, then each time the one that
    maximises min-distance-to-chosen x (1 - score). `sent`: feature rows of items chosen
    before (earlier batches), counted as chosen (then the first pick is by that rule too).
    Deterministic (ties: lowest index). Cost: k x n x d (n rows of d values)."""
    n = len(features)
    k = min(max(0, int(k)), n)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    x = np.asarray(features, dtype=np.float32).reshape(n, -1)
    w = _weights(scores)
    sq = np.einsum("ij,ij->i", x, x)

    def dist(c: np.ndarray) -> np.ndarray:  # |x - c|^2 = |x|^2 + |c|^2 - 2 x.c (one matrix-vector product)
        return np.sqrt(np.maximum(sq + float(c @ c) - 2.0 * (x @ c), 0.0))

    taken = np.zeros(n, dtype=bool)
    if sent is not None and len(sent):
        c = np.asarray(sent, dtype=np.float32).reshape(len(sent), -1)  # one matrix product: n x len(sent)
        d = np.sqrt(np.maximum((sq[:, None] + np.einsum("ij,ij->i", c, c)[None, :] - 2.0 * (x @ c.T)).min(axis=1), 0.0))
        first = int(np.argmax(d * w))
    else:
        first = int(pick_uncertain(scores, 1)[0])
        d = dist(x[first])
    chosen = [first]
    taken[first] = True
    d = np.minimum(d, dist(x[first]))
    for _ in range(k - 1):
        gain = np.where(taken, -1.0, d * w)
        nxt = int(np.argmax(gain))
        chosen.append(nxt)
        taken[nxt] = True
        d = np.minimum(d, dist(x[nxt]))
    return np.asarray(chosen, dtype=np.int64)


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared euclidean distances [len(a), len(b)] (one matrix product)."""
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T), 0.0)


def kmeans(features: np.ndarray, k: int, weights: np.ndarray | None = None, iters: int = 20,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding (row weights optional): (cluster of each row,
    centres). Deterministic for a given seed. Cost: iters x n x k x d."""
    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    n = len(x)
    k = min(max(1, int(k)), n)
    rng = np.random.default_rng(seed)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    centres = [int(rng.choice(n, p=w / w.sum()))]
    d = _sq_distances(x, x[centres])[:, 0]
    for _ in range(k - 1):
        p = d * w
        total = p.sum()
        centres.append(int(rng.choice(n, p=p / total)) if total > 0 else int(np.argmax(~np.isin(np.arange(n), centres))))
        d = np.minimum(d, _sq_distances(x, x[centres[-1:]])[:, 0])
    c = x[centres].copy()
    for _ in range(iters):
        assign = _sq_distances(x, c).argmin(1)
        order = np.argsort(assign, kind="stable")  # each cluster's rows together, in index order
        bounds = np.searchsorted(assign[order], np.arange(k + 1))
        for j in range(k):
            m = order[bounds[j] : bounds[j + 1]]
            if len(m):
                c[j] = (x[m] * w[m, None]).sum(0) / w[m].sum()
    return _sq_distances(x, c).argmin(1), c


def pick_clustered(features: np.ndarray, scores: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Uncertainty-weighted k-means, then the representative of each cluster: k clusters
    over the rows of `features` (already normalised), each row weighted by its uncertainty
    1 - score (clipped to [0.01, 1]), and from each cluster the row nearest its centre;
    returned the most uncertain first. Short of k (empty clusters), the most uncertain rows
    not taken fill up. Deterministic. Cost: 20 x n x k x d."""
    n = len(features)
    k = min(max(0, int(k)), n)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    x = np.asarray(features, dtype=np.float32).reshape(n, -1)
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), 0.5, s)
    assign, centres = kmeans(x, k, weights=_weights(s))
    picked = []
    for j in range(k):
        m = np.flatnonzero(assign == j)
        if len(m):
            picked.append(int(m[np.argmin(_sq_distances(x[m], centres[j : j + 1])[:, 0])]))
    if len(picked) < k:
        taken = set(picked)
        picked += [int(i) for i in np.argsort(s, kind="stable") if int(i) not in taken][: k - len(picked)]
    picked.sort(key=lambda i: (s[i], i))
    return np.asarray(picked, dtype=np.int64)


def thumbnail(data: bytes) -> np.ndarray | None:
    """A THUMB_SIDE x THUMB_SIDE grey thumbnail of an encoded image as a flat float32
    vector, or None when Pillow cannot decode it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("L", (4 * THUMB_SIDE, 4 * THUMB_SIDE))  # JPEG: decode at a reduced scale
            grey = im.convert("L") if im.mode != "L" else im
            small = grey.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
            return np.asarray(small, dtype=np.float32).ravel()
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for bad input
        return None


def thumbnails_of_pixels(images: np.ndarray) -> np.ndarray:
    """The same feature for decoded grey images [n, h, w] (the simulation's pool)."""
    from PIL import Image

    out = np.empty((len(images), THUMB_SIDE * THUMB_SIDE), dtype=np.float32)
    for i, img in enumerate(np.asarray(images)):
        a = np.asarray(img, dtype=np.float32)
        if a.max() <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8).reshape(a.shape[-2:]), mode="L")
        out[i] = np.asarray(im.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0),
                            dtype=np.float32).ravel()
    return out


def choose(strategy: str, scores: Sequence[float], assets: Sequence[bytes] | None, k: int,
           features: Sequence[np.ndarray | None] | None = None) -> list[int]:
    """Positions (into the candidates) of the k to send, in sending order. `features`: a row
    per candidate already computed, thumbnails or the model's embeddings, all of one kind and
    length (None where there is none: ranked by uncertainty after the others); otherwise
    thumbnails computed from `assets`."""
    strategy = parse_selection(strategy)
    n = len(scores)
    k = min(max(0, int(k)), n)
    if strategy == "fifo":
        return list(range(k))
    if strategy == "uncertainty":
        return [int(i) for i in pick_uncertain(scores, k)]
    if features is None:
        assert assets is not None
        features = [thumbnail(a) for a in assets]
    images = [i for i in range(n) if features[i] is not None]
    others = [i for i in range(n) if features[i] is None]
    picked: list[int] = []
    if images:
        s = np.asarray([scores[i] for i in images], dtype=np.float64)
        x = normalise(np.stack([features[i] for i in images]))
        picked = [images[int(j)] for j in pick_clustered(x, s, min(k, len(images)))]
    if len(picked) < k and others:
        s = np.asarray([scores[i] for i in others], dtype=np.float64)
        picked += [others[int(j)] for j in pick_uncertain(s, k - len(picked))]
    return picked


def _usable(embedding, item_id) -> np.ndarray | None:
    """An embedding as float32 when it can be a feature row (`near_duplicates.checked_embedding`),
    else None."""
    if embedding is None:
        return None
    try:
        return checked_embedding(embedding)
    except ValueError as e:
        log.debug("selection: the embedding of item %s is not usable: %s", item_id, e)
        return None


@dataclass
class Selector:
    """Asked by the uploader, for a group whose allowance is below its due items, which
    items to send. The items' embeddings come with the candidates (no asset is read for
    them); thumbnails are cached by content hash (bounded). `diverse` plans the
    clusters for the group's whole budget at once and hands the plan out batch by batch
    (the simulation's round: one budget chosen at once); a new plan is made when fewer of
    its items are still due than the batch asks for. Plans live in memory (a restart
    plans again)."""

    strategy: str = "fifo"
    pool: int = DEFAULT_POOL
    cache_size: int = 20_000
    last_seconds: float = 0.0
    """Time the last `select` took (query, decoding, picking)."""
    plans_made: int = 0
    last_basis: str = ""
    """What the last plan clustered: "thumbnails", or "embeddings of MODEL/VERSION [D]"."""
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    """content hash -> thumbnail (or None: undecodable)."""
    _plans: dict = field(default_factory=dict, repr=False)
    """group -> ids of the current plan still to send, in sending order."""
    _budget: dict = field(default_factory=dict, repr=False)
    """group -> the largest allowance seen (the size of a plan)."""

    def __post_init__(self) -> None:
        self.strategy = parse_selection(self.strategy)
        if self.pool <= 0:
            raise ValueError(f"selection pool must be positive, got {self.pool}")
        # A plan reads up to `pool` candidates' thumbnails at once: a smaller cache would only
        # evict some before the next plan.
        self.cache_size = max(self.cache_size, self.pool)

    @property
    def active(self) -> bool:
        return self.strategy != "fifo"

    def _thumbnails(self, outbox, cands: Sequence[tuple]) -> list[np.ndarray | None]:
        """Each candidate's thumbnail (None where undecodable), cached by content hash; only
        the assets not cached are read."""
        missing = []
        for c in cands:
            if c[2] in self._cache:
                self._cache.move_to_end(c[2])
            else:
                missing.append(c[0])
        got = {c[2]: self._cache[c[2]] for c in cands if c[2] in self._cache}
        for item in outbox.queued_items(missing) if missing else ():
            got[item.content_hash] = self._cache[item.content_hash] = thumbnail(item.asset)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return [got.get(c[2]) for c in cands]

    def features(self, outbox, cands: Sequence[tuple]) -> list[np.ndarray | None]:
        """The feature row of each candidate (id, score, content hash, asset, embedding, model:
        `selection_candidates(with_embeddings=True)`) for `diverse`: the embeddings of the model
        and dimension most candidates' are of (None for the rest; no asset is read), or, when
        no candidate has an embedding, thumbnails (None where undecodable)."""
        rows = [_usable(c[4], c[0]) for c in cands]
        spaces: dict[tuple, list[int]] = {}
        for c, e in zip(cands, rows):
            if e is not None:
                spaces.setdefault((c[5], len(e)), []).append(c[0])
        if spaces:  # the most common; a tie: the one of the newest item (a redeploy's)
            chosen = max(spaces, key=lambda k: (len(spaces[k]), max(spaces[k])))
            self.last_basis = f"embeddings of {chosen[0]} [{chosen[1]}]"
            return [e if e is not None and (c[5], len(e)) == chosen else None for c, e in zip(cands, rows)]
        self.last_basis = "thumbnails"
        return self._thumbnails(outbox, cands)

    def select(self, outbox, group: str, allowance: int, limit: int, *, now: float,
               max_delay_s: float | None = None, ignore_backoff: bool = False) -> list[int] | None:
        """Ids of at most `limit` items of `group` to send now, chosen among its due items
        when they outnumber `allowance`; None when the budget does not bind (FIFO applies)."""
        if not self.active or allowance <= 0:
            return None
        started = time.perf_counter()
        cands = outbox.selection_candidates(group, self.pool, now=now, max_delay_s=max_delay_s,
                                            ignore_backoff=ignore_backoff, with_assets=False, with_embeddings=True)
        if len(cands) <= allowance:
            self._plans.pop(group, None)
            return None
        k = min(allowance, limit)
        scores = [c[1] for c in cands]
        if self.strategy == "diverse":
            due = {c[0] for c in cands}
            plan = [i for i in self._plans.get(group, ()) if i in due]
            if len(plan) < k:
                size = self._budget[group] = max(allowance, self._budget.get(group, 0))
                feats = self.features(outbox, cands)
                plan = [cands[i][0] for i in choose("diverse", scores, None, size, features=feats)]
                self.plans_made += 1
                log.debug("selection diverse: planned %d of %d candidates of group %s over %s", len(plan), len(cands),
                          group, self.last_basis)
            self._plans[group] = plan
            ids = plan[:k]
        else:
            ids = [cands[i][0] for i in choose(self.strategy, scores, None, k)]
        self.last_seconds = time.perf_counter() - started
        log.debug("selection %s: %d of %d candidates of group %s in %.1f ms", self.strategy, len(ids),
                  len(cands), group, 1e3 * self.last_seconds)
        return ids


__all__ = ["SELECTIONS", "DEFAULT_POOL", "Selector", "choose", "kmeans", "normalise", "parse_selection", "pick_clustered",
           "pick_kcenter", "pick_uncertain", "thumbnail", "thumbnails_of_pixels"]

