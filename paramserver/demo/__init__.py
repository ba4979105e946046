"""The main job: two worker processes train a tiny transformer with their optimizer in the service."""
