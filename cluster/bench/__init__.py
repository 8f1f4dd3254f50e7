"""Experiments apart from the driver: the `lorafleet bench` sub-commands, `compare`, `eval`,
`nlu-table` and `meet-table`, each a run of the real Trainer or actors through one harness."""
