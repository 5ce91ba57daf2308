"""emotion-stream: classify social posts from Kafka with MC Dropout uncertainty."""

from worker.onednn import bound_onednn_caches

bound_onednn_caches()  # before any bf16 matmul in the process: see onednn.py

__version__ = "0.1.0"
