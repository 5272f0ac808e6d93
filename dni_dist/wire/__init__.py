"""The gRPC wire format: stubs generated from proto/dni.proto (checked in) and the
conversions between tensors and protobuf messages.

Bottom layer, beside ``core``: it imports only ``core.messages`` (what a message and a
stream are) and ``errors``, never the transports that carry it."""
