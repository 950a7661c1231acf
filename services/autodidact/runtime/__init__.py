"""What every autodidact service runs on: the gRPC server host, interceptors,
logging, metrics and the channel factory for service-to-service calls."""
