"""What the tests share: loopback servers (fileserver, hubserver), builders of inputs and adapters (helpers,
images), reference answers (engine), requests through the real server (server), and tools that rebuild tests/data."""
