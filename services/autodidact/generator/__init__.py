"""The generator service: samples text from the LLM backend."""
