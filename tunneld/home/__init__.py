"""The home daemon: the session to the relay, TLS termination, the upstream side."""
