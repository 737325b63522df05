"""Generated gRPC stubs for the rpp.v1 wire contract (protos/rpp/v1/).

Do not edit the *_pb2* files by hand: `python scripts/gen_protos.py` regenerates them, and a test
fails when they drift from protos/. This package imports grpc and protobuf only, never torch.
"""

from rpp_lightning.proto import generation_pb2, reward_pb2

# The services' full names, from the contract itself: clients (health checks, channel waits) and
# servers (registration, health, reflection) name them from here, never from a string of their own.
GENERATION_SERVICE: str = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
REWARD_SERVICE: str = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
