"""Domain layer of the HE runtime: plain Python over SEAL, no gRPC types."""
