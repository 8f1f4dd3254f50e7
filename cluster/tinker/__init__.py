"""`lorafleet serve`: the Tinker API (as the `tinker` SDK speaks it) on lorafleet's fleet:
config, wire formats, server state, the service and its HTTP routes (docs/tinker.md)."""
