"""For the tests and benchmarks, not a user surface: a Ray head on loopback that stops cleanly,
to which nodes can be added and killed (local_head)."""
