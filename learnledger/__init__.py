"""Generated gRPC stubs for the learnledger protocol (see protos/ and scripts/gen_protos.py)."""
