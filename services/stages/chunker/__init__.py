"""Chunker: LLM reply deltas to display text and speakable chunks (pure core, CLI, stage shell)."""
