"""Shared utilities used across lorafleet."""
