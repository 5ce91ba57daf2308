"""Kafka integration for the worker (clients, reading, delivery, topic admin, replay); the local
broker for tests and demos is tooling: ``worker.devtools.local_broker``."""
