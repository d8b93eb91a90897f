"""The history stage: the conversation memory, kept in SQLite."""
