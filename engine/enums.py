"""The engine's value sets, each defined once: series, result and run statuses, view kinds and
output kinds. Plain strings, because they are written as such into stores, run records and
JSON logs; the tuples keep their documented order (stores index statuses by position).

Label vocabularies (regions, contrasts, tissues, location words) live beside them, in
``engine/vocabulary.py``.
"""

from __future__ import annotations

# ---- a series group's status in the store (``series/<key>`` attrs) ---------------------------
INCOMPLETE, COMPLETE, FAILED, SKIPPED = "incomplete", "complete", "failed", "skipped"
SERIES_STATUSES = (INCOMPLETE, COMPLETE, FAILED, SKIPPED)  # what write_series writes
FINAL_STATUSES = (COMPLETE, FAILED)  # written last; a group in one of these is whole
UNKNOWN = "unknown"  # an index row for a damaged group or a failed write
ROW_STATUSES = (UNKNOWN, *SERIES_STATUSES)  # index/status holds positions in this tuple

# ---- what a run did with a series (RunSummary, the summary table, the run record) -------------
RESUMED = "resumed"
RESULT_STATUSES = (COMPLETE, FAILED, SKIPPED, RESUMED)  # the run record's counts, in this order
DONE_STATUSES = (COMPLETE, RESUMED)  # the series has every selected head's outputs

# ---- a run's status (``runs/<run_id>`` attrs) ------------------------------------------------
RUNNING, FINISHED, INTERRUPTED, ABANDONED = "running", "finished", "interrupted", "abandoned"
RUN_STATUSES = (RUNNING, FINISHED, INTERRUPTED, FAILED, ABANDONED)
RUN_ENDS = (FINISHED, INTERRUPTED, FAILED)  # what a run that ends by itself records

# ---- views and outputs (schemas/head.schema.json holds the same sets) --------------------------
GLOBAL, TILES = "global", "tiles"
VIEW_KINDS = (GLOBAL, TILES)
MASK, SCORES, BOXES, EMBEDDING, VALUE = "mask", "scores", "boxes", "embedding", "value"
OUTPUT_KINDS = (MASK, SCORES, BOXES, EMBEDDING, VALUE)
