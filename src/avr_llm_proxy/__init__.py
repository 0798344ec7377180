"""avr-llm-proxy: the caller-aware LLM endpoint for Agent Voice Response on Asterisk."""

__version__ = "0.1.0"
