"""End-to-end recipes: small datasets and models to train and distil from scratch (issue 4)."""
