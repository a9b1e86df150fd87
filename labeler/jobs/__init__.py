"""File-owning jobs behind the CLI and the backend: listing, loading, atomic writes, runs."""
