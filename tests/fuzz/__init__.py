"""Property-based fuzzing of every request of JobService and ShardService (hypothesis)."""
