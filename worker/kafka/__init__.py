"""Kafka integration for the worker (clients, delivery, a local broker for tests and demos)."""
