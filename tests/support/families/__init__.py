"""Tiny local stand-ins for the published model families (see ``builders``)."""
