"""Everything between a prompt and a recorded vote: vLLM engine, pair sampling, prompt queue."""
