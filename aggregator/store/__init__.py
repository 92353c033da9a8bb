"""Aggregator storage behind one small interface (`Store`); SQLite is the embedded default."""

from aggregator.store.base import IngestOutcome, LabelSet, Store, canonical_labels, parse_labels
from aggregator.store.sqlite import SqliteStore

__all__ = ["IngestOutcome", "LabelSet", "SqliteStore", "Store", "canonical_labels",
           "parse_labels"]
