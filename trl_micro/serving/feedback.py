"""
The server's feedback path: comparisons scored on the model's thread, then recorded in the user store on a thread of
their own, so scoring never waits for a commit.

`FeedbackRecorder.record` writes one request's comparisons (posterior updates and log rows) in one transaction: it
either commits, and the answer is sent, or changes nothing, and the request fails (503) with nothing kept in memory;
the scorer's cached weights of the users it wrote are dropped after the commit. The backbone readings of the scored
responses go to the feature store in segments of `segment_size` sequences (and at shutdown), so that a rebuild for new
heads on the same backbone reads them instead of running it; readings lost to a crash before their segment is written
are computed again by the rebuild.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..feature_cache import READINGS, FeatureStore, backbone_fingerprint, reward_model_fingerprint
from ..personalization.stores import CachedUserStore, Comparison, RecordedComparison

logger = logging.getLogger(__name__)


class FeedbackRecorder:
    """
    Records scored comparisons in `cache.store` on its own thread (see the module docstring).

    Args:
        model: the served `MiCRoRewardModel` (its fingerprint goes into every log row).
        cache ([`CachedUserStore`]): the scorer's view of the store; its entries of written users are dropped.
        feature_store ([`FeatureStore`], *optional*): where the readings of feedback go; `None` keeps none.
        segment_size (`int`, defaults to 512): sequences per feature segment written.
    """

    def __init__(self, model, cache: CachedUserStore, feature_store: FeatureStore | None = None, segment_size=512):
        self.cache = cache
        self.model_fingerprint = reward_model_fingerprint(model)
        self.backbone = backbone_fingerprint(model.backbone) if feature_store is not None else None
        self.feature_store = feature_store
        self.segment_size = segment_size
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trl-micro-store")
        self._keys: list[str] = []
        self._readings: dict[str, list[torch.Tensor]] = {name: [] for name in READINGS}
        self._buffer_lock = threading.Lock()

    def record(self, comparisons: list[Comparison], scored: dict) -> list[RecordedComparison]:
        """Apply and log `comparisons` with their `scored` margins (`MiCRoReward.comparison_margins`); commits first."""
        results = self.cache.store.record_comparisons(
            comparisons,
            scored["head_margins"],
            model_fingerprint=self.model_fingerprint,
            feature_keys=scored["feature_keys"] if self.feature_store is not None else None,
            feature_backbone=self.backbone,
        )
        self.cache.invalidate([result.user_id for result in results])
        if self.feature_store is not None and any(not result.duplicate for result in results):
            self._keep_features(scored["sequence_keys"], scored["readings"])
        return results

    def _keep_features(self, keys: list[str], readings: dict[str, torch.Tensor]) -> None:
        with self._buffer_lock:
            self._keys += keys
            for name in READINGS:
                self._readings[name].append(readings[name])
            if len(self._keys) >= self.segment_size:
                self._flush_locked()

    def flush(self) -> None:
        """Write the buffered readings as one feature segment."""
        with self._buffer_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._keys:
            return
        try:
            self.feature_store.add(self._keys, {name: torch.cat(parts) for name, parts in self._readings.items()})
        except (OSError, ValueError) as error:  # features are a cache: a rebuild recomputes what is missing
            logger.warning("Could not keep the readings of %d feedback sequences: %s", len(self._keys), error)
        self._keys = []
        self._readings = {name: [] for name in READINGS}

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        if self.feature_store is not None:
            self.flush()
