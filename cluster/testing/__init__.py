"""For the tests and benchmarks, not a user surface: a Ray head on loopback that stops cleanly
(local_head) and a worker that dies at a chosen step (faults, switched on by environment)."""
