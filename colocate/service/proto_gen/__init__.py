"""Python code generated from proto/: colocate/v1/colocate.proto (the Generation
service) and grpc/health/v1/health.proto (the standard health service).

Do not edit the *_pb2*.py files by hand: change the .proto and run `make proto`
(which runs `python -m colocate.service.proto_gen.build`). The generated files
are checked in so that installing colocate needs no protoc.
"""
