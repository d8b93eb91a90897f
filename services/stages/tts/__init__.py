"""The tts stage: speakable chunks in, PCM frames out."""
