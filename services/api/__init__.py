"""gRPC entrypoints: servicers translate messages; the interceptor maps errors and records metrics."""
