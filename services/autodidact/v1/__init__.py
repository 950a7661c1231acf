"""Generated gRPC stubs of protos/autodidact/v1. Never edit by hand: run scripts/generate_stubs.py."""
