"""Where the sans-IO protocol meets trio: the WebSocket session and its streams."""
