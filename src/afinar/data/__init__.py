"""Data: read example files in the common formats, validate them, tokenise and batch them."""
