"""Cross-cutting plumbing every stage uses: our error types, the one hook mechanism, prompt/target tokenization."""
