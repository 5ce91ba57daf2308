"""emotion-stream: classify social posts from Kafka with MC Dropout uncertainty."""

__version__ = "0.1.0"
