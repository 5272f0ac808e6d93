"""The gRPC wire format: stubs generated from proto/dni.proto (checked in) and the
conversions between tensors and protobuf messages."""
