"""Reading and writing weight files safely: validated safetensors headers, bounded-memory shard writing,
atomic small-file writes and disk-space checks. Importing this package does not import torch."""
