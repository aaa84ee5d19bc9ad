"""Python code generated from proto/colocate/v1/colocate.proto.

Do not edit colocate_pb2*.py by hand: change the .proto and run `make proto`
(which runs `python -m colocate.serving.proto_gen.build`). The generated files
are checked in so that installing colocate needs no protoc.
"""
