"""The tool-executor service: tools run on model-written input, sandboxed and bounded."""
