"""Training pieces: the task objects, the checkpoint-safe Trainers, resilience, callbacks and metrics."""
