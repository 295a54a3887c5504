"""moec's distributed runtime (expert parallelism): process groups, all-to-all, streams."""
