"""The "torch" backend: SDPA, the chunked path for wide heads, and their routes."""
