"""Process plumbing every stage shares: atomic writes, paths, device, progress, distributed, configs."""
