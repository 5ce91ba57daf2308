"""Tools for developing and demonstrating the worker, not part of what it runs: the local Kafka
broker that ``make demo``, the bench and the tests start (``local_broker``)."""
