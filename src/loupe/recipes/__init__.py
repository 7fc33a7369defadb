"""Training recipes shipped with Loupe (YAML; see `loupe.recipe`)."""
