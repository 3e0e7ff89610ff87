"""The public relay: SNI routing, the tunnel endpoint, the session registry."""
