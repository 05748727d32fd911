//! Device worker, model pool, adapter registry, queue and step-level batcher. Filled by the engine issue.
