"""Channels, replicas and the one server runner; no torch, so reward servers deploy without it."""
