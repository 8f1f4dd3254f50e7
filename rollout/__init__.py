"""lorafleet role package."""
