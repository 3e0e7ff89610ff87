"""Sans-IO core: frames, the multiplexer state machine, the ClientHello parser.

Nothing in this package imports trio, socket or ssl.
"""
