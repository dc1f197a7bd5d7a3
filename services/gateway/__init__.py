"""The HTTP gateway: authenticated FastAPI API for banks, fund administrators and ops."""
