"""The HTTP coordinator: admission (secrets, rates), its state machine over SQLite (service) and its FastAPI app (http)."""
