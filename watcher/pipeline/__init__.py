"""The pipeline: jobs -> decode (CPU threads) -> model worker (one thread, batches) -> writer."""
