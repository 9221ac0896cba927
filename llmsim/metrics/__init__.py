"""Records emitted by the simulation core, and the summaries computed from them afterwards."""
