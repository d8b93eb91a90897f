"""The llm stage: turns a request into a stream of tokens from a configured provider."""
