"""Infrastructure shared by every TenSafe service: config, logging, telemetry, gRPC
bootstrap, error mapping, database and JetStream helpers.

Nothing here knows about a particular service's domain.
"""
