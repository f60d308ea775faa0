"""Generation: sampling parameters, the backend protocol, and the OpenAI layer above it."""
