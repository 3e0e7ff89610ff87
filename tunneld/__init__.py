"""tunneld: remote access for a home server, TLS end to end through an SNI relay."""

__version__ = "0.1.0"
