"""The registry's domain: plain Python, no gRPC types."""
