"""CosyVoice2 TTS engine: frontend, LLM, flow, HiFT and the cross-stream streaming scheduler."""
