"""The pipeline's stages, one package each, each a pure core and a thin bus shell: llm (request to
tokens), chunker (tokens to display text and speakable chunks), tts (chunks to audio), player (audio
to sound) and history (what was said, heard and commanded).  `tags` (the command-tag grammar) and
`audio` (PCM types) are what two stages share."""
