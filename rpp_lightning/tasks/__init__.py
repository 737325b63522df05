"""Bundled tasks: small datasets the project generates itself (no download)."""
