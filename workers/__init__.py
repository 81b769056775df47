"""GPU workers and the pure-PyTorch compaction core they run."""
