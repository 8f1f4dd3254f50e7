"""Tasks: the interface (`base.py`), one module per kind of task (`addition.py`, `nlu.py`,
`vader.py`), and the registry with the config's `task:` section (`registry.py`)."""
