"""The player stage: PCM frames in, sound (and playback events) out."""
