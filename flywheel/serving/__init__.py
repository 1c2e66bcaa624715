"""flywheel serve: the OpenAI-compatible API, its engine, the request log and the stable router."""
