"""The round engine: phases, aggregation claims, effects, notifications and events."""
