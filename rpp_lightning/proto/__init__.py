"""Generated gRPC stubs for the rpp.v1 wire contract (protos/rpp/v1/).

Do not edit the *_pb2* files by hand: `python scripts/gen_protos.py` regenerates them, and a test
fails when they drift from protos/. This package imports grpc and protobuf only, never torch.
"""
