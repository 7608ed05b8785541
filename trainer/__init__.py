"""Alignment rounds: snapshot votes, IPO on LoRA with TRL, gate, promote, hot-swap."""
