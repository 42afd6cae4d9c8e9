"""Defence math: pure functions shared by the guard and (later) its vLLM plugin."""
