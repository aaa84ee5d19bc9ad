"""One service's process: its gRPC door, engine front and loop, auth, TLS, health
(or a fused group's process, several services over one engine group)."""
